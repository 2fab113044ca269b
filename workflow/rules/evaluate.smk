from conv2dlstm.config.strata import region_mask_files, stratified_plots


rule evaluate:
    """Score one run, persistence, climatology and damped persistence on the test period, with bootstrap
    skill intervals, on the whole grid and per configured region and season; log into the run's MLflow run."""
    input:
        windows=rules.windows.output,
        stats=rules.normalize.output,
        checkpoint=rules.train.output,
        # the mask files of evaluate.regions: a changed mask reruns evaluate
        masks=region_mask_files(config),
    output:
        metrics=f"{OUT}/evaluate/{{run}}/metrics.csv",
        predictions=f"{OUT}/evaluate/{{run}}/predictions.nc",
        predictions_zarr=directory(f"{OUT}/evaluate/{{run}}/predictions.zarr"),
        rmse=report(
            f"{OUT}/evaluate/{{run}}/rmse_vs_lead.png",
            caption="../report/rmse_vs_lead.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        acc=report(
            f"{OUT}/evaluate/{{run}}/acc_vs_lead.png",
            caption="../report/acc_vs_lead.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        skill=report(
            f"{OUT}/evaluate/{{run}}/skill_vs_lead.png",
            caption="../report/skill_vs_lead.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        maps=report(
            f"{OUT}/evaluate/{{run}}/maps.png",
            caption="../report/maps.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        rmse_map=report(
            f"{OUT}/evaluate/{{run}}/rmse_map.png",
            caption="../report/rmse_map.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        # skill_by_region.png, skill_by_season.png: only with evaluate.regions, evaluate.by_season
        **{
            os.path.splitext(name)[0]: report(
                f"{OUT}/evaluate/{{run}}/{name}",
                caption="../report/skill_by_stratum.rst",
                category="Evaluation",
                subcategory="{run}",
            )
            for name in stratified_plots(config)
        },
        # animation.gif: only with evaluate.animation_lead above 0
        **(
            {
                "animation": report(
                    f"{OUT}/evaluate/{{run}}/animation.gif",
                    caption="../report/animation.rst",
                    category="Evaluation",
                    subcategory="{run}",
                )
            }
            if config["evaluate"]["animation_lead"]
            else {}
        ),
    params:
        *determines_params(config, "evaluate"),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{run}}.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m conv2dlstm evaluate --config-json \"$CONV2DLSTM_CONFIG\" --run {wildcards.run:q}"
        " --windows {input.windows:q} --stats {input.stats:q} --checkpoint {input.checkpoint:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


localrules:
    compare,


rule compare:
    """One table and one plot comparing every run with the baselines; tags the runs' MLflow runs
    with the sweep and registers the experiment's best model as models:/<experiment>@champion."""
    input:
        metrics=expand(f"{OUT}/evaluate/{{run}}/metrics.csv", run=RUNS),
        models=expand(f"{OUT}/train/{{run}}/model.pt", run=RUNS),
        # read beside each metrics.csv: the lead time of the plot's lead axis
        predictions=expand(f"{OUT}/evaluate/{{run}}/predictions.nc", run=RUNS),
        # the seed ensembles' means, listed as entries (none without an ensemble)
        ensembles=expand(f"{OUT}/ensemble/{{ensemble}}/metrics.csv", ensemble=list(ENSEMBLES)),
    output:
        csv=f"{COMPARE}.csv",
        plot=report(f"{COMPARE}.png", caption="../report/compare.rst", category="Comparison"),
    log:
        f"{LOGS}/compare/{os.path.basename(COMPARE)}.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m conv2dlstm compare --config-json \"$CONV2DLSTM_CONFIG\" --metrics {input.metrics:q}"
        " --models {input.models:q} --ensembles {input.ensembles:q} --out-csv {output.csv:q}"
        " --out-plot {output.plot:q} > {log:q} 2>&1"
