"""The configuration: its schema (``workflow/schemas/config.schema.yaml``), validation, the rerun
contract (which key determines which step), sweeps and the Snakefile's helpers."""
