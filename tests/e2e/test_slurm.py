"""`snakemake --profile slurm` against a real one-node SLURM cluster started on this machine.

The cluster (tests/slurm/start-cluster.sh) runs slurmctld and slurmd as root with munge; the
profile is the small one users run first, slurm-smoke/config.v8+.yaml (the real slurm/ profile with
2 threads, small memory and no GPU), with tests/slurm/overlay.yaml merged in (squeue status polling,
job logs kept). The tests are skipped only when slurm-wlm or munge is not installed; a cluster that
is installed but does not start is a failure. The profiles themselves are checked without a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.slurm.merge_profile import BASE_PROFILE, OVERLAY, SMOKE_PROFILE, deep_merge, write_merged_profile
from tests.support.workflow import REPO, copy_workflow, job_env

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

SCRIPTS = REPO / "tests" / "slurm"
DAEMONS = ("slurmctld", "slurmd", "munged")
PIPELINE_TIMEOUT_S = 1200  # the whole default pipeline through SLURM
NON_LOCAL_RULES = ("regrid", "normalize", "windows", "train", "evaluate")
LOCAL_RULES = ("synth", "fetch", "compare")
DRIVER = REPO / "slurm" / "snakemake.sbatch"  # Snakemake itself as a SLURM job
# Top-level keys in which slurm-smoke/ may differ from slurm/ (its header says how).
SMOKE_DIFFERS = {"retries", "keep-going", "set-threads", "set-resources"}
# The plugin's INFO line for every sbatch submission.
SUBMITTED = re.compile(
    r"Job (?P<job>\d+) has been submitted with SLURM jobid (?P<slurm>\d+) "
    r"\(log: (?P<log>\S*/rule_(?P<rule>\w+)/\S*?)\)\."
)


@dataclass(frozen=True)
class Cluster:
    """A running test cluster: its directory and the SLURM_CONF every SLURM command needs."""

    dir: Path
    conf: str

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for Snakemake and SLURM commands: this interpreter first, SLURM_CONF set."""
        env = job_env({"SLURM_CONF": self.conf, **extra})
        for var in ("SBATCH_PARTITION", "SBATCH_GPU_PARTITION", "SBATCH_ACCOUNT"):
            if var not in extra:
                env.pop(var, None)
        return env


def _installed(exe: str) -> bool:
    return shutil.which(exe) is not None or Path("/usr/sbin", exe).exists()


def _cluster_logs(cdir: Path) -> str:
    parts = []
    for log in sorted((cdir / "log").glob("*")):
        lines = log.read_text(errors="replace").splitlines()[-30:]
        parts.append(f"----- {log} -----\n" + "\n".join(lines))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node cluster for this module's tests, stopped (daemons killed by PID) at the end."""
    missing = [exe for exe in DAEMONS if not _installed(exe)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed; the SLURM tests need `apt-get install -y slurm-wlm munge` (and root)"
        )
    cdir = tmp_path_factory.mktemp("slurm-cluster")
    try:
        try:
            started = subprocess.run(
                ["bash", str(SCRIPTS / "start-cluster.sh"), str(cdir)],
                capture_output=True,
                text=True,
                timeout=180,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"start-cluster.sh did not finish in 180 s\n{exc.stderr}\n{_cluster_logs(cdir)}")
        if started.returncode != 0:
            pytest.fail(
                f"the SLURM test cluster did not start (rc {started.returncode}):\n"
                f"{started.stdout}\n{started.stderr}\n{_cluster_logs(cdir)}"
            )
        conf = started.stdout.strip().splitlines()[-1]
        assert conf.startswith("SLURM_CONF="), started.stdout
        yield Cluster(dir=cdir, conf=conf.split("=", 1)[1])
    finally:
        subprocess.run(
            ["bash", str(SCRIPTS / "stop-cluster.sh"), str(cdir)],
            capture_output=True,
            text=True,
            timeout=180,
        )


def snakemake_session(
    args: list[str], *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake in its own session; on a timeout kill the whole group and unlock the directory."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        out, _ = proc.communicate()
        _unlock(cwd, env)
        pytest.fail(f"snakemake did not finish in {timeout:.0f} s: {' '.join(args)}\n{out[-6000:]}")
    if proc.returncode != 0:
        _unlock(cwd, env)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _unlock(cwd: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--unlock", "--cores", "1"],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=120,
    )


def submitted_jobs(output: str) -> dict[str, list[tuple[str, Path]]]:
    """Rule name -> [(SLURM job id, SLURM log path)] from the executor's submission lines."""
    jobs: dict[str, list[tuple[str, Path]]] = {}
    for m in SUBMITTED.finditer(output):
        jobs.setdefault(m["rule"], []).append((m["slurm"], Path(m["log"])))
    return jobs


def scontrol_job(cluster: Cluster, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as key -> value; finished jobs stay visible for MinJobAge (an hour)."""
    out = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", job_id],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def failure_report(result: subprocess.CompletedProcess[str], workdir: Path) -> str:
    """Snakemake's output tail plus the SLURM job logs and rule logs, for an assertion message."""
    parts = [result.stdout[-6000:]]
    for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
        parts.append(f"----- {log} -----\n{log.read_text(errors='replace')[-3000:]}")
    for log in sorted((workdir / "results" / "logs").rglob("*.log")):
        parts.append(f"----- {log} -----\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The profile itself (no cluster needed, but it needs the SLURM executor plugin installed).


def test_profile_reads_partition_and_account_from_environment() -> None:
    profile = yaml.safe_load(BASE_PROFILE.read_text())
    assert profile["executor"] == "slurm"
    resources = profile["set-resources"]
    assert set(NON_LOCAL_RULES) <= set(resources)
    for rule in NON_LOCAL_RULES:
        # Neither partition nor account is written down: both come from the environment.
        assert "environ" in resources[rule]["slurm_partition"], rule
        assert "SBATCH_ACCOUNT" in resources[rule]["slurm_account"], rule
        assert {"mem_mb", "runtime"} <= set(resources[rule]), rule
    train = resources["train"]
    # The train rule asks for its GPUs itself (resource gpu -> --gpus); asking again is an error.
    assert "gres" not in train and "gpu" not in train
    assert "--signal=TERM@" in train["slurm_extra"] and "B:" not in train["slurm_extra"]
    for rule in LOCAL_RULES:
        assert rule not in resources


def test_deep_merge_keeps_other_keys_and_removes_null() -> None:
    base = {"a": 1, "r": {"train": {"gres": "gpu:1", "mem_mb": 9}, "x": {"m": 1}}}
    merged = deep_merge(base, {"a": 2, "r": {"train": {"gres": None, "mem_mb": 3}}})
    assert merged == {"a": 2, "r": {"train": {"mem_mb": 3}, "x": {"m": 1}}}
    assert base["r"]["train"]["gres"] == "gpu:1"  # the input is not modified


def dry_run_resources(output: str) -> dict[str, str]:
    """Rule name -> its ``resources:`` line in the output of ``snakemake -n``."""
    blocks = re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", output, re.M | re.S)
    return {name: re.search(r"resources: (.*)", body)[1] for name, body in blocks if "resources:" in body}


def test_dry_run_resolves_partitions_per_rule(tmp_path: Path) -> None:
    """`snakemake --profile slurm -n` in the repo root: the GPU partition goes to train only."""
    wf = copy_workflow(tmp_path / "wf")
    env = job_env({"SBATCH_PARTITION": "cpuq", "SBATCH_GPU_PARTITION": "gpuq", "SBATCH_ACCOUNT": "proj1"})
    result = snakemake_session(["--profile", "slurm", "-n"], cwd=wf, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-4000:]
    resources = dry_run_resources(result.stdout)
    for rule in NON_LOCAL_RULES:
        assert "slurm_account=proj1" in resources[rule], resources[rule]
        expected = "gpuq" if rule == "train" else "cpuq"
        assert f"slurm_partition={expected}," in resources[rule], resources[rule]
    assert "gpu=1," in resources["train"] and "gres=" not in resources["train"]
    assert "--signal=TERM@600" in resources["train"]


def test_smoke_profile_is_the_real_one_with_small_jobs() -> None:
    """slurm-smoke/ differs from slurm/ only in job sizes, GPU, train's partition and retries."""
    real = yaml.safe_load(BASE_PROFILE.read_text())
    smoke = yaml.safe_load(SMOKE_PROFILE.read_text())
    assert set(smoke) == set(real)
    for key in set(real) - SMOKE_DIFFERS:
        assert smoke[key] == real[key], key
    assert smoke["retries"] == 0 and smoke["keep-going"] is False
    assert set(smoke["set-threads"]) == set(real["set-threads"])
    assert all(n <= 2 for n in smoke["set-threads"].values())
    cpu_partition = real["set-resources"]["regrid"]["slurm_partition"]
    assert set(smoke["set-resources"]) == set(real["set-resources"])
    for rule, big in real["set-resources"].items():
        small = smoke["set-resources"][rule]
        assert set(small) - set(big) <= {"gpu"}, rule
        for key in set(big) - {"mem_mb", "runtime", "slurm_partition"}:
            assert small[key] == big[key], (rule, key)
        # Every job goes to the CPU partition, train included.
        assert small["slurm_partition"] == cpu_partition, rule
        assert small["mem_mb"] <= min(4000, big["mem_mb"]) and small["runtime"] <= min(30, big["runtime"]), rule
    assert smoke["set-resources"]["train"]["gpu"] == 0


def test_test_profile_is_the_smoke_profile(tmp_path: Path) -> None:
    """The SLURM tests run slurm-smoke/ with only the test cluster's settings changed."""
    overlay = yaml.safe_load(OVERLAY.read_text())
    assert not set(overlay) & {"set-threads", "set-resources", "retries", "keep-going", "executor"}
    merged = yaml.safe_load((write_merged_profile(tmp_path / "profile") / "config.v8+.yaml").read_text())
    smoke = yaml.safe_load(SMOKE_PROFILE.read_text())
    assert merged == {**smoke, **overlay}


def test_smoke_dry_run_asks_for_small_cpu_jobs(tmp_path: Path) -> None:
    """The smoke test's command, dry: small jobs, every one on SBATCH_PARTITION, no GPU, outputs
    under the given outdir and resources_dir."""
    wf = copy_workflow(tmp_path / "wf")
    env = job_env({"SBATCH_PARTITION": "cpuq", "SBATCH_GPU_PARTITION": "gpuq", "SBATCH_ACCOUNT": "proj1"})
    args = ["--profile", "slurm-smoke", "--configfile", "tests/configs/tiny.yaml", "-n"]
    args += ["--config", "outdir=smoke/results", "resources_dir=smoke/resources"]
    result = snakemake_session(args, cwd=wf, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-4000:]
    resources = dry_run_resources(result.stdout)
    for rule in NON_LOCAL_RULES:
        assert "slurm_partition=cpuq," in resources[rule] and "slurm_account=proj1" in resources[rule], rule
        assert "runtime=30" in resources[rule], resources[rule]
        assert int(re.search(r"mem_mb=(\d+)", resources[rule])[1]) <= 3000, resources[rule]
    assert "gpu=0," in resources["train"] and "gpuq" not in result.stdout
    outputs = re.findall(r"^    output: (.*)", result.stdout, re.M)
    paths = [p for line in outputs for p in line.split(", ")]
    assert paths and all(p.startswith(("smoke/results/", "smoke/resources/")) for p in paths), paths


def test_driver_script_dry_run(tmp_path: Path) -> None:
    """slurm/snakemake.sbatch run as SLURM would (in the submit directory, SLURM_* set): Snakemake
    with the profile PROFILE names, this job's CPUs for the local rules, and the arguments given."""
    header = [line for line in DRIVER.read_text().splitlines() if line and not line.startswith("#!")]
    directives = [line for line in header if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(header) if not line.startswith("#"))
    assert all(header.index(line) < first_command for line in directives)  # sbatch reads them only there
    assert "#SBATCH --signal=B:INT@600" in directives and "#SBATCH --cpus-per-task=1" in directives
    wf = copy_workflow(tmp_path / "wf")
    env = job_env({"SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "1", "SBATCH_PARTITION": "cpuq"})
    env["PROFILE"] = "slurm-smoke"
    env.pop("MLFLOW_SERVER", None)
    run = subprocess.run(
        ["bash", str(wf / "slurm" / "snakemake.sbatch"), "-n", "--configfile", "tests/configs/tiny.yaml"],
        cwd=wf,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "Using profiles slurm-smoke" in run.stdout + run.stderr
    resources = dry_run_resources(run.stdout)
    assert "slurm_partition=cpuq," in resources["train"] and "gpu=0," in resources["train"]
    assert "results/compare/tiny.csv" in run.stdout  # --configfile reached Snakemake
    elsewhere = subprocess.run(["bash", str(DRIVER)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert elsewhere.returncode == 1 and "submit from the repository root" in elsewhere.stderr


# ---------------------------------------------------------------------------------------------
# Jobs on the cluster.

TINY_SNAKEFILE = """
# Rule names of the pipeline, so that the profile's per-rule settings apply.
localrules:
    fetch


rule all:
    input:
        "model.txt",


rule fetch:
    output:
        "raw.txt",
    shell:
        "echo 1 2 3 4 > {output}; echo ${{SLURM_JOB_ID:-none}} > fetch.jobid"


rule regrid:
    input:
        "raw.txt",
    output:
        "regrid.txt",
    shell:
        "python -c 'import sys; print(*[2 * int(v) for v in open(sys.argv[1]).read().split()])'"
        " {input} > {output}; echo ${{SLURM_JOB_ID:-none}} > regrid.jobid"


rule train:
    input:
        "regrid.txt",
    output:
        "model.txt",
    resources:
        gpu=1,
    shell:
        "python -c 'import sys; print(sum(int(v) for v in open(sys.argv[1]).read().split()))'"
        " {input} > {output}; echo ${{SLURM_JOB_ID:-none}} > train.jobid"
"""


def test_tiny_workflow_runs_through_sbatch(slurm_cluster: Cluster, tmp_path: Path) -> None:
    wf = tmp_path / "tiny"
    wf.mkdir()
    (wf / "Snakefile").write_text(textwrap.dedent(TINY_SNAKEFILE))
    profile = write_merged_profile(tmp_path / "profile")
    env = slurm_cluster.env(SBATCH_GPU_PARTITION="gpu")

    result = snakemake_session(["--profile", str(profile)], cwd=wf, env=env, timeout=240)
    assert result.returncode == 0, failure_report(result, wf)

    assert (wf / "regrid.txt").read_text().split() == ["2", "4", "6", "8"]
    assert (wf / "model.txt").read_text().strip() == "20"

    jobs = submitted_jobs(result.stdout)
    assert set(jobs) == {"regrid", "train"}, result.stdout[-4000:]  # fetch is a local rule
    assert (wf / "fetch.jobid").read_text().strip() == "none"
    for rule in ("regrid", "train"):
        ((job_id, log),) = jobs[rule]
        # The rule's command ran inside that SLURM job, and the job's log is where the plugin says.
        assert (wf / f"{rule}.jobid").read_text().strip() == job_id
        assert log.is_file() and f"rule {rule}:" in log.read_text()
        info = scontrol_job(slurm_cluster, job_id)
        assert info["JobState"] == "COMPLETED", info
        assert info["NumCPUs"] == "2" and info["TimeLimit"] == "00:30:00", info
    regrid = scontrol_job(slurm_cluster, jobs["regrid"][0][0])
    train = scontrol_job(slurm_cluster, jobs["train"][0][0])
    # SBATCH_PARTITION unset: the cluster's default partition, for train too (the smoke profile does
    # not use SBATCH_GPU_PARTITION).
    assert regrid["Partition"] == "debug" and train["Partition"] == "debug"
    assert regrid["MinMemoryNode"] == "2000M" and train["MinMemoryNode"] == "3000M"
    # The profile's gpu: 0 replaced the rule's gpu=1: no GPU request (the node has none).
    assert "gpu" not in train.get("TresPerNode", "") + train.get("TresPerJob", "")


# ---------------------------------------------------------------------------------------------
# The whole pipeline, compared with a local run.


def _default_outputs(wf: Path) -> tuple[Path, list[Path]]:
    """The windows store and every run's metrics.csv of a finished pipeline."""
    windows = sorted((wf / "results" / "windows").glob("*.zarr"))
    metrics = sorted((wf / "results" / "evaluate").glob("*/metrics.csv"))
    assert len(windows) == 1 and metrics, f"missing outputs under {wf / 'results'}"
    return windows[0], metrics


def test_pipeline_on_slurm_matches_local_run(slurm_cluster: Cluster, tiny_run: Path, tmp_path: Path) -> None:
    """The whole pipeline (the tiny configuration: the same rules and profile on less data) through
    sbatch gives exactly the outputs of the local run."""
    import zarr

    wf = copy_workflow(tmp_path / "wf")
    shutil.copy(tiny_run / "tiny.yaml", wf / "tiny.yaml")
    profile = write_merged_profile(tmp_path / "profile")
    env = slurm_cluster.env(SBATCH_GPU_PARTITION="gpu")

    result = snakemake_session(
        ["--profile", str(profile), "--configfile", "tiny.yaml"], cwd=wf, env=env, timeout=PIPELINE_TIMEOUT_S
    )
    assert result.returncode == 0, failure_report(result, wf)

    # Every non-local step was an sbatch job that completed; the local rules were not submitted.
    jobs = submitted_jobs(result.stdout)
    assert set(NON_LOCAL_RULES) <= set(jobs), result.stdout[-4000:]
    assert not set(LOCAL_RULES) & set(jobs)
    for rule in NON_LOCAL_RULES:
        for job_id, log in jobs[rule]:
            assert scontrol_job(slurm_cluster, job_id)["JobState"] == "COMPLETED", rule
            assert log.is_file(), log
    assert all(scontrol_job(slurm_cluster, j)["Partition"] == "debug" for j, _ in jobs["train"])

    windows, metrics = _default_outputs(wf)
    local_windows, local_metrics = _default_outputs(tiny_run)
    assert [m.relative_to(wf) for m in metrics] == [m.relative_to(tiny_run) for m in local_metrics]

    # The data steps are deterministic: exactly the same values, not just close ones.
    got, want = zarr.open_group(windows, mode="r"), zarr.open_group(local_windows, mode="r")
    for name in ("data", "mask", "train_start", "val_start", "test_start"):
        np.testing.assert_array_equal(np.asarray(got[name][...]), np.asarray(want[name][...]), err_msg=name)

    # Training on the CPU is deterministic (fixed seeds, deterministic kernels) and both runs use
    # 2 threads per step on the same machine: the metrics are equal to the last bit.
    for mine, theirs in zip(metrics, local_metrics):
        pd.testing.assert_frame_equal(
            pd.read_csv(mine), pd.read_csv(theirs), check_exact=True, obj=str(mine.relative_to(wf))
        )
