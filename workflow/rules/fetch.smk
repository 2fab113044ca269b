localrules:
    fetch,


rule fetch:
    """Download (url, zarr, copernicus) or locate (files) the raw data and checksum it."""
    input:
        fetch_inputs,
    output:
        f"{RES}/raw/{NAME}/manifest.json",
    params:
        *determines_params(config, "fetch"),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/fetch.log",
    benchmark:
        f"{BENCH}/fetch.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m conv2dlstm fetch --config-json \"$CONV2DLSTM_CONFIG\" --out-dir {params.out_dir:q} > {log:q} 2>&1"
