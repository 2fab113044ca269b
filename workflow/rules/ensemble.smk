rule ensemble:
    """Score one seed ensemble (runs that differ only in train.seed, conv2dlstm.config.ensembles) on the
    test period: its mean like a network with the baselines and skill intervals, its CRPS, spread,
    spread-skill ratio and rank histogram, each member's RMSE; logged as the ensemble's own MLflow run."""
    input:
        predictions=lambda wildcards: expand(
            f"{OUT}/evaluate/{{run}}/predictions.nc", run=ENSEMBLES[wildcards.ensemble].members
        ),
        windows=rules.windows.output,
        stats=rules.normalize.output,
    output:
        metrics=f"{OUT}/ensemble/{{ensemble}}/metrics.csv",
        rank_csv=f"{OUT}/ensemble/{{ensemble}}/rank_histogram.csv",
        rank_png=report(
            f"{OUT}/ensemble/{{ensemble}}/rank_histogram.png",
            caption="../report/rank_histogram.rst",
            category="Ensembles",
            subcategory="{ensemble}",
        ),
    wildcard_constraints:
        ensemble="|".join(re.escape(e) for e in ENSEMBLES) or "(?!)",
    params:
        *determines_params(config, "ensemble"),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    log:
        f"{LOGS}/ensemble/{{ensemble}}.log",
    benchmark:
        f"{BENCH}/ensemble/{{ensemble}}.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m conv2dlstm ensemble --config-json \"$CONV2DLSTM_CONFIG\" --ensemble {wildcards.ensemble:q}"
        " --predictions {input.predictions:q} --windows {input.windows:q} --stats {input.stats:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
