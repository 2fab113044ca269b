from conv2dlstm.training.distributed import rule_launcher


rule train:
    """Train one run. Checkpoints every epoch under the run directory; on SIGTERM/SIGUSR1 or shortly
    before the job's runtime limit it checkpoints and exits non-zero, and a rerun resumes from the
    last checkpoint. model.pt, the best checkpoint, is written last. With train.gpus > 1 the step
    runs as that many torchrun workers (the launcher resource: python -m conv2dlstm, or torchrun ...
    -m -- conv2dlstm; a resource, not a param, since train.gpus determines no result)."""
    input:
        windows=rules.windows.output,
        stats=rules.normalize.output,
    output:
        f"{OUT}/train/{{run}}/model.pt",
    params:
        *determines_params(config, "train"),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=lambda wildcards: train_gpus(config, wildcards.run),
        launcher=lambda wildcards: rule_launcher(config, wildcards.run),
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "{resources.launcher} train --config-json \"$CONV2DLSTM_CONFIG\" --run {wildcards.run:q}"
        " --windows {input.windows:q} --stats {input.stats:q} --out-dir {params.out_dir:q}"
        " --time-limit-minutes {resources.runtime} > {log:q} 2>&1"
