import os
import re
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# The configuration is validated once, here, against workflow/schemas/config.schema.yaml (the
# package reads the same file); defaults are filled in before any rule is built.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from conv2dlstm.config.ensembles import ensembles
from conv2dlstm.config.runs import run_names
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError
from conv2dlstm.config.workflow import (
    compare_stem,
    determines_params,
    export_config,
    export_package_path,
    source_files,
    train_gpus,
)

try:
    config.update(validate_config(config))
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None

# The rerun contract (conv2dlstm.config.keys): a rule's params hold exactly the config values that
# determine its outputs (each key's x-steps annotation in the schema), one `key=value` param per key
# (determines_params), so Snakemake reruns a rule when one of them changes, and never for a runtime
# setting (parallelism, retries, devices, the Dask scheduler, the tracking store), and its reason
# names the changed keys only: `before: 'train.epochs=10' now: 'train.epochs=4'`. Each step reads
# the whole validated configuration from the environment variable CONV2DLSTM_CONFIG, which is not
# a rerun trigger, and sees only the keys annotated for it or for a step upstream of it.
export_config(config)

OUT = config["outdir"]
RES = config["resources_dir"]
NAME = config["name"]
RUNS = run_names(config)
# Seed ensembles: runs that differ only in train.seed (conv2dlstm.config.ensembles), name -> Ensemble
ENSEMBLES = {e.name: e for e in ensembles(config)}
COMPARE = compare_stem(config)
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"

# Jobs (local or on a cluster) inherit this environment: every rule runs the package from this
# checkout, whether or not it is installed in the job's environment (envs/ carry dependencies only).
export_package_path(workflow.basedir)


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS),


def fetch_inputs(wildcards):
    """The synthetic data when the config generates it; the files of a files source (a replaced,
    added or removed file reruns fetch); for a url source the upstream.json that check-upstream
    writes when files changed upstream (source_files); nothing for the other kinds."""
    if config["synthetic"]["kind"] != "none":
        return rules.synth.output
    return source_files(config)


def all_outputs():
    """What `rule all` asks for. Every output the evaluate rule declares, the figures that only some
    configurations draw included (evaluate.regions, by_season, animation_lead): Snakemake compares a
    job's params with those recorded only when every output the job declares has a record, so a
    newly configured figure must be a missing output that is asked for, which reruns evaluate."""
    return [
        f"{OUT}/windows/{NAME}.zarr",
        *expand(f"{OUT}/train/{{run}}/model.pt", run=RUNS),
        *expand(list(rules.evaluate.output), run=RUNS),
        *expand(f"{OUT}/ensemble/{{ensemble}}/metrics.csv", ensemble=list(ENSEMBLES)),
        f"{COMPARE}.csv",
    ]
