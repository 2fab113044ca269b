localrules:
    synth,


rule synth:
    """Generate the embedded synthetic ocean in its real file format (offline default data)."""
    output:
        directory(f"{RES}/synthetic/{NAME}"),
    params:
        config=config_json(config, "name", "synthetic"),
    log:
        f"{LOGS}/synth.log",
    benchmark:
        f"{BENCH}/synth.tsv"
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m conv2dlstm synth --config-json {params.config:q} --out-dir {output:q} > {log:q} 2>&1"
