localrules:
    synth,


rule synth:
    """Generate the embedded synthetic ocean in its real file format (offline default data)."""
    output:
        directory(f"{RES}/synthetic/{NAME}"),
    params:
        *determines_params(config, "synth"),
    log:
        f"{LOGS}/synth.log",
    benchmark:
        f"{BENCH}/synth.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m conv2dlstm synth --config-json \"$CONV2DLSTM_CONFIG\" --out-dir {output:q} > {log:q} 2>&1"
