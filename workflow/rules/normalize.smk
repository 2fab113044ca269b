rule normalize:
    """Fit mean/std, day-of-year climatology and land mask on the training period only."""
    input:
        rules.regrid.output,
    output:
        f"{OUT}/normalize/{NAME}.nc",
    params:
        *determines_params(config, "normalize"),
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        f"{LOGS}/normalize.log",
    benchmark:
        f"{BENCH}/normalize.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m conv2dlstm normalize --config-json \"$CONV2DLSTM_CONFIG\" --data {input:q} --out {output:q}"
        " --threads {threads} --memory-mb {resources.mem_mb} > {log:q} 2>&1"
