"""The workflow steps: one module per Snakemake rule, each with the ``main`` that ``python -m
conv2dlstm <step>`` calls. Steps never import each other (``make lint``: import-linter); what two
steps share is a library module."""
