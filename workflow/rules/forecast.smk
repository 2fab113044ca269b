# Forecast with the experiment's best model; not part of `rule all`. Run it on demand:
#   snakemake forecast --cores 2                          -> results/forecast/latest.{nc,zarr}, initial date source.end
#   snakemake results/forecast/2021-12-01.nc --cores 2    -> that initial date (and the .zarr beside it)
# (targets before --configfile, which takes several files)
# The model is models:/<experiment>@champion (registered by compare), else the only run's model.pt;
# for a given MLflow run or checkpoint call the step itself: python -m conv2dlstm forecast --help.
rule forecast:
    """Forecast from the latest input days (ending on source.end) with the champion model."""
    input:
        stats=rules.normalize.output,
        compare=f"{COMPARE}.csv",
    output:
        nc=f"{OUT}/forecast/latest.nc",
        zarr=directory(f"{OUT}/forecast/latest.zarr"),
    params:
        *determines_params(config, "fetch", "regrid", "normalize"),  # the forecast's inputs and statistics
        work_dir=f"{RES}/forecast/{NAME}",
    log:
        f"{LOGS}/forecast/latest.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m conv2dlstm forecast --config-json \"$CONV2DLSTM_CONFIG\" --stats {input.stats:q}"
        " --out-nc {output.nc:q} --out-zarr {output.zarr:q} --work-dir {params.work_dir:q} > {log:q} 2>&1"


rule forecast_date:
    """Forecast from the input days ending on {date} (YYYY-MM-DD) with the champion model."""
    input:
        stats=rules.normalize.output,
        compare=f"{COMPARE}.csv",
    output:
        nc=f"{OUT}/forecast/{{date}}.nc",
        zarr=directory(f"{OUT}/forecast/{{date}}.zarr"),
    wildcard_constraints:
        date=r"\d{4}-\d{2}-\d{2}",
    params:
        *determines_params(config, "fetch", "regrid", "normalize"),  # the forecast's inputs and statistics
        work_dir=f"{RES}/forecast/{NAME}",
    log:
        f"{LOGS}/forecast/{{date}}.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m conv2dlstm forecast --config-json \"$CONV2DLSTM_CONFIG\" --stats {input.stats:q}"
        " --init-date {wildcards.date} --out-nc {output.nc:q} --out-zarr {output.zarr:q}"
        " --work-dir {params.work_dir:q} > {log:q} 2>&1"
