rule windows:
    """Store the normalized cube once plus the start index of every train/val/test window."""
    input:
        data=rules.regrid.output,
        stats=rules.normalize.output,
    output:
        directory(f"{OUT}/windows/{NAME}.zarr"),
    params:
        *determines_params(config, "windows"),
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        f"{LOGS}/windows.log",
    benchmark:
        f"{BENCH}/windows.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m conv2dlstm windows --config-json \"$CONV2DLSTM_CONFIG\" --data {input.data:q} --stats {input.stats:q}"
        " --out {output:q} --threads {threads} --memory-mb {resources.mem_mb} > {log:q} 2>&1"
