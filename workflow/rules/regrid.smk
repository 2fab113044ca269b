rule regrid:
    """Harmonize to (time, lat, lon) and regrid to the target grid, streamed chunk by chunk to Zarr."""
    input:
        rules.fetch.output,
    output:
        directory(f"{OUT}/regrid/{NAME}.zarr"),
    params:
        *determines_params(config, "regrid"),
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        f"{LOGS}/regrid.log",
    benchmark:
        f"{BENCH}/regrid.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m conv2dlstm regrid --config-json \"$CONV2DLSTM_CONFIG\" --manifest {input:q} --out {output:q}"
        " --threads {threads} --memory-mb {resources.mem_mb} > {log:q} 2>&1"
