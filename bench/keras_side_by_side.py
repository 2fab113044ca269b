"""The notebook's network, trained by this project (PyTorch) and by Keras 3 (TensorFlow backend), side by side.

    python bench/keras_side_by_side.py                # sets up .venv-keras if missing, prints the table
    python bench/keras_side_by_side.py --check        # exit 1 when a keras_ratio_min (bench/targets.yaml) is missed
    python bench/keras_side_by_side.py --setup-only   # only create .venv-keras (bench/keras/requirements.txt)

The network is the project's ``conv2d_lstm`` (:func:`conv2dlstm.training.models.build_model` with
:func:`conv2dlstm.training.models.model_kwargs_from_config` and the defaults of ``model.conv2d_lstm`` in
config/config.yaml) and the same architecture written in Keras: per frame
``[Conv2D(f, k, relu) -> MaxPool(2)] for f in filters -> Flatten`` (TimeDistributed), ``LSTM(lstm_units)``,
``Dense(dense_units, relu)``, ``Dense(H * W * targets)``. Both train (forward + backward + AdamW step,
MSE, ``train.learning_rate`` and ``train.weight_decay`` of the config) on the same random batch:
16 samples of 5 time steps, 3 channels, 1 target, on the grids 48 x 28 and 128 x 128; tensors
``(batch, time, channel, lat, lon)`` for torch, channels-last ``(batch, time, lat, lon, channel)``
for Keras. PyTorch's LSTM has two bias vectors (input and recurrent), Keras's one: the torch model has
``4 * lstm_units`` more trainable parameters, and the script checks that this is the only difference.

Each framework runs in its own worker process: torch in this venv (``--worker torch``), Keras in
``.venv-keras`` (``--worker keras``; TensorFlow is never a project dependency). This process sends one
JSON line per command to a worker's stdin and reads one JSON line back, so only one framework computes
at a time and the rounds alternate: after a warm-up, torch round, Keras round, torch, Keras, ... Each
round trains for ``--seconds`` (at least one step) and reports samples/s; the table gives the median
over rounds per framework and the median of the per-round ratios torch / Keras, per grid. A last
round of forward passes alone (in training mode) per framework says where the time goes: the
second table gives milliseconds per batch, forward / whole training step.

Thread settings (``--threads``, one pair of fresh workers each, since TensorFlow fixes its thread
pools when it starts): ``default`` leaves both frameworks as they come (torch: ``nproc`` OpenMP
threads; TensorFlow: intra-op and inter-op pools of ``nproc`` threads each); a number ``N`` limits both
to ``N`` compute threads (``torch.set_num_threads(N)``, ``torch.set_num_interop_threads(1)``;
``tf.config.threading.set_intra_op_parallelism_threads(N)``, ``set_inter_op_parallelism_threads(1)``).
``--check`` uses the ratio at each grid of ``keras_ratio_min`` with both limited to ``nproc`` threads
(both sides get the whole machine, the fair comparison).

OpenMP: importing ``conv2dlstm`` sets how OpenMP threads wait (a brief spin, then sleep; unless the
environment sets it) and
torch runs on GNU OpenMP; TensorFlow loads no OpenMP runtime (its kernels and oneDNN run on its own
Eigen thread pools), so the variable does not concern it. Both workers report what they ran with, and
this process reports the CPU time the waiting worker used during the other's rounds (near 0: the
idle side's threads sleep). Results are printed and written as JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KERAS_VENV = REPO / ".venv-keras"
REQUIREMENTS = HERE / "keras" / "requirements.txt"

GRIDS = ((48, 28), (128, 128))  # (lat, lon)
BATCH, TIME_STEPS, CHANNELS, TARGETS, LEAD = 16, 5, 3, 1, 1


# ----------------------------------------------------------------------------------------------
# Workers: one framework each, one JSON line in and one out per command
# ----------------------------------------------------------------------------------------------


def random_batch(height: int, width: int):
    """The same random batch for both workers: ``x (B, T, C, H, W)``, ``y (B, LEAD, TARGETS, H, W)``, float32."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, TIME_STEPS, CHANNELS, height, width), dtype=np.float32)
    y = rng.standard_normal((BATCH, LEAD, TARGETS, height, width), dtype=np.float32)
    return x, y


def threading_libraries() -> list[str]:
    """OpenMP / MKL / oneDNN shared libraries mapped into this process."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.rsplit("/", 1)[-1].strip()
            if name.startswith(("libgomp", "libiomp", "libomp", "libmkl", "libdnnl", "libtbb")):
                names.add(name)
    return sorted(names)


class TorchWorker:
    """The project's conv2d_lstm, built with the project's own code."""

    def __init__(self, threads: int | None) -> None:
        import conv2dlstm  # noqa: F401  (sets OpenMP's waiting before torch loads, as in the pipeline)

        # isort: split
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
            torch.set_num_interop_threads(1)
        self.torch = torch

    def info(self) -> dict:
        from conv2dlstm import openmp_waiting
        from conv2dlstm.training.hostmemory import retain_freed_memory

        torch = self.torch
        return {
            "framework": f"torch {torch.__version__}",
            "threads": f"{torch.get_num_threads()} OpenMP (interop {torch.get_num_interop_threads()})",
            "OpenMP waiting": openmp_waiting(),
            "host memory": retain_freed_memory(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "libraries": threading_libraries(),
        }

    def build(self, height: int, width: int, arch: dict | None) -> dict:
        torch = self.torch
        from conv2dlstm.config.validate import load_config
        from conv2dlstm.training.models import build_model, count_parameters, model_kwargs_from_config

        cfg = load_config(REPO / "config" / "config.yaml")
        kwargs = model_kwargs_from_config(
            {**cfg["model"], "name": "conv2d_lstm"},
            input_variables=[f"in{i}" for i in range(CHANNELS)],
            target_variables=[f"target{i}" for i in range(TARGETS)],
            input_steps=TIME_STEPS,
            lead_steps=LEAD,
            height=height,
            width=width,
        )
        torch.manual_seed(0)
        self.model = build_model("conv2d_lstm", **kwargs)
        lr, weight_decay = cfg["train"]["learning_rate"], cfg["train"]["weight_decay"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        x, y = random_batch(height, width)  # (batch, time, channel, lat, lon), (batch, lead, target, lat, lon)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        arch = {k: kwargs[k] for k in ("filters", "kernel_size", "lstm_units", "dense_units")}
        return {"params": count_parameters(self.model), "arch": arch, "learning_rate": lr, "weight_decay": weight_decay}

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def forward(self) -> float:
        """The forward pass alone, recording for autograd as in training."""
        return float(self.model(self.x).detach()[0, 0, 0, 0, 0])


class KerasWorker:
    """The same architecture in Keras 3, TensorFlow backend, channels-last."""

    def __init__(self, threads: int | None) -> None:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        self.tf, self.keras = tf, keras

    def info(self) -> dict:
        tf, keras = self.tf, self.keras
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        inter = tf.config.threading.get_inter_op_parallelism_threads()
        return {
            "framework": f"keras {keras.__version__} / tensorflow-cpu {tf.__version__} ({keras.backend.backend()})",
            "threads": f"intra-op {intra or f'0 = {os.cpu_count()}'}, inter-op {inter or f'0 = {os.cpu_count()}'}",
            "OpenMP waiting": "none (TensorFlow runs no OpenMP)",
            "oneDNN": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
            "libraries": threading_libraries(),
        }

    def build(self, height: int, width: int, arch: dict) -> dict:
        import numpy as np

        keras, layers = self.keras, self.keras.layers
        keras.utils.set_random_seed(0)
        inputs = keras.Input((TIME_STEPS, height, width, CHANNELS))
        h = inputs
        for f in arch["filters"]:
            h = layers.TimeDistributed(layers.Conv2D(f, arch["kernel_size"], activation="relu"))(h)
            h = layers.TimeDistributed(layers.MaxPooling2D(2))(h)
        h = layers.TimeDistributed(layers.Flatten())(h)
        h = layers.LSTM(arch["lstm_units"])(h)
        h = layers.Dense(arch["dense_units"], activation="relu")(h)
        h = layers.Dense(LEAD * height * width * TARGETS)(h)
        outputs = layers.Reshape((LEAD, height, width, TARGETS))(h)
        self.model = keras.Model(inputs, outputs)
        optimizer = keras.optimizers.AdamW(learning_rate=arch["learning_rate"], weight_decay=arch["weight_decay"])
        self.model.compile(optimizer=optimizer, loss="mse")  # jit_compile="auto": no XLA on a CPU-only machine
        x, y = random_batch(height, width)
        # channels-last: (batch, time, lat, lon, channel), (batch, lead, lat, lon, target)
        self.x = self.tf.constant(np.ascontiguousarray(x.transpose(0, 1, 3, 4, 2)))
        self.y = self.tf.constant(np.ascontiguousarray(y.transpose(0, 1, 3, 4, 2)))
        params = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
        self.step()  # the first step traces the train function; report whether it runs with XLA
        self._forward = self.tf.function(lambda x: self.model(x, training=True))
        self.forward()
        return {"params": params, "jit_compile": bool(self.model.jit_compile)}

    def step(self) -> float:
        return float(self.model.train_on_batch(self.x, self.y))

    def forward(self) -> float:
        """The forward pass alone (the model in training mode, in a tf.function like the train step)."""
        return float(self._forward(self.x)[0, 0, 0, 0, 0])


def worker_main(framework: str, threads: int | None) -> int:
    """Answer the commands on stdin, one JSON line each; stdout carries only the answers."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else the frameworks print goes to stderr
    worker = TorchWorker(threads) if framework == "torch" else KerasWorker(threads)
    answers.write(json.dumps(worker.info()) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "build":
            answer = worker.build(cmd["height"], cmd["width"], cmd.get("arch"))
        elif cmd["cmd"] in ("warmup", "round", "forward"):
            run = worker.forward if cmd["cmd"] == "forward" else worker.step
            steps, t0 = 0, time.perf_counter()
            while steps < cmd["min_steps"] or time.perf_counter() - t0 < cmd["seconds"]:
                loss = run()
                steps += 1
            seconds = time.perf_counter() - t0
            answer = {"steps": steps, "seconds": seconds, "samples_per_s": steps * BATCH / seconds, "loss": loss}
        elif cmd["cmd"] == "quit":
            return 0
        else:
            raise ValueError(f"unknown command {cmd}")
        answers.write(json.dumps(answer) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def ensure_keras_venv(venv: Path) -> Path:
    """``venv``'s python, creating the venv from bench/keras/requirements.txt when it is missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"setting up {venv} from {REQUIREMENTS.relative_to(REPO)} (once; about 1.6 GB)", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    probe = subprocess.run(
        [str(python), "-c", "import tensorflow, keras"],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        sys.exit(
            f"{venv} does not import tensorflow and keras ({probe.stderr.strip().splitlines()[-1:]}); "
            f"remove it and run again to set it up from {REQUIREMENTS.relative_to(REPO)}"
        )
    return python


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Worker:
    """A worker process and its JSON-lines pipe."""

    def __init__(self, name: str, python: str, threads: int | None, env: dict[str, str]) -> None:
        self.name = name
        args = [python, str(Path(__file__).resolve()), "--worker", name]
        if threads is not None:
            args += ["--worker-threads", str(threads)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited (status {self.proc.wait()}); see its errors above")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run_setting(threads: int | None, keras_python: Path, rounds: int, seconds: float, warmup: float) -> dict:
    """Both workers with one thread setting; per grid: build, warm up, alternate ``rounds`` rounds."""
    torch_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    keras_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    keras_env |= {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    torch_w = Worker("torch", sys.executable, threads, torch_env)
    keras_w = Worker("keras", str(keras_python), threads, keras_env)
    setting: dict = {"threads": "default" if threads is None else threads, "torch": torch_w.info, "keras": keras_w.info}
    try:
        for height, width in GRIDS:
            built_t = torch_w.ask(cmd="build", height=height, width=width)
            arch = built_t["arch"] | {k: built_t[k] for k in ("learning_rate", "weight_decay")}
            built_k = keras_w.ask(cmd="build", height=height, width=width, arch=arch)
            extra = built_t["params"] - built_k["params"]
            if extra != 4 * arch["lstm_units"]:
                raise RuntimeError(
                    f"{height}x{width}: torch has {built_t['params']} trainable parameters, Keras {built_k['params']}: "
                    f"the difference {extra} is not the second LSTM bias (4 * {arch['lstm_units']})"
                )
            for w in (torch_w, keras_w):
                w.ask(cmd="warmup", seconds=warmup, min_steps=2)
            per_round: dict[str, list[dict]] = {"torch": [], "keras": []}
            idle_cpu: list[float] = []
            for _ in range(rounds):
                for w, other in ((torch_w, keras_w), (keras_w, torch_w)):
                    cpu0, other0 = cpu_seconds(w.proc.pid), cpu_seconds(other.proc.pid)
                    r = w.ask(cmd="round", seconds=seconds, min_steps=1)
                    r["cores_busy"] = (cpu_seconds(w.proc.pid) - cpu0) / r["seconds"]
                    idle_cpu.append(cpu_seconds(other.proc.pid) - other0)
                    per_round[w.name].append(r)
            forward_ms = {}  # where the time goes: one round of forward passes alone, after the training rounds
            for w in (torch_w, keras_w):
                r = w.ask(cmd="forward", seconds=seconds / 2, min_steps=1)
                forward_ms[w.name] = 1000 * r["seconds"] / r["steps"]
            ratios = [t["samples_per_s"] / k["samples_per_s"] for t, k in zip(per_round["torch"], per_round["keras"])]
            setting[f"{height}x{width}"] = {
                "params_torch": built_t["params"],
                "params_keras": built_k["params"],
                "keras_jit_compile": built_k["jit_compile"],
                "arch": arch,
                "torch": statistics.median(r["samples_per_s"] for r in per_round["torch"]),
                "keras": statistics.median(r["samples_per_s"] for r in per_round["keras"]),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "torch_cores_busy": statistics.median(r["cores_busy"] for r in per_round["torch"]),
                "keras_cores_busy": statistics.median(r["cores_busy"] for r in per_round["keras"]),
                "idle_worker_cpu_s_max": max(idle_cpu),
                "torch_forward_ms": forward_ms["torch"],
                "keras_forward_ms": forward_ms["keras"],
                "rounds": per_round,
            }
            print(
                f"  threads {setting['threads']}, {height}x{width}: torch {setting[f'{height}x{width}']['torch']:.1f}, "
                f"keras {setting[f'{height}x{width}']['keras']:.1f} samples/s, ratio {statistics.median(ratios):.2f}",
                file=sys.stderr,
            )
    finally:
        torch_w.close()
        keras_w.close()
    return setting


def table(results: dict) -> str:
    rows = [
        "| threads (both) | grid | trainable params torch / Keras | torch samples/s | Keras samples/s "
        "| torch / Keras (median, min-max) | cores busy torch / Keras |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in results["settings"]:
        for height, width in GRIDS:
            g = s[f"{height}x{width}"]
            rows.append(
                f"| {s['threads']} | {height} x {width} | {g['params_torch']:,} / {g['params_keras']:,} "
                f"| {g['torch']:.1f} | {g['keras']:.1f} "
                f"| **{g['ratio']:.2f}** ({g['ratio_min']:.2f}-{g['ratio_max']:.2f}) "
                f"| {g['torch_cores_busy']:.2f} / {g['keras_cores_busy']:.2f} |"
            )
    rows += [
        "",
        "| threads (both) | grid | torch ms per batch: forward / step | Keras ms per batch: forward / step |",
        "| --- | --- | --- | --- |",
    ]
    for s in results["settings"]:
        for height, width in GRIDS:
            g = s[f"{height}x{width}"]
            ms = {side: f"{g[f'{side}_forward_ms']:.0f} / {1000 * BATCH / g[side]:.0f}" for side in ("torch", "keras")}
            rows.append(f"| {s['threads']} | {height} x {width} | {ms['torch']} | {ms['keras']} |")
    return "\n".join(rows)


def parse_threads(text: str) -> list[int | None]:
    return [None if t == "default" else int(t) for t in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when keras_ratio_min is missed")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per framework and grid")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of a round (at least one step)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per framework and grid")
    parser.add_argument(
        "--threads",
        default=f"{os.cpu_count()},default,1",
        help="comma-separated thread settings: 'default' or a count for both (default: nproc,default,1)",
    )
    parser.add_argument("--keras-venv", type=Path, default=KERAS_VENV, help="venv with tensorflow-cpu and keras")
    parser.add_argument("--setup-only", action="store_true", help="only set up the Keras venv")
    parser.add_argument("--worker", choices=("torch", "keras"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.worker_threads)

    keras_python = ensure_keras_venv(args.keras_venv.resolve())
    if args.setup_only:
        return 0
    import targets

    goals = targets.load()
    results: dict = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "settings": [],
    }
    t0 = time.perf_counter()
    for threads in parse_threads(args.threads):
        results["settings"].append(run_setting(threads, keras_python, args.rounds, args.seconds, args.warmup))
    results["load_after"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - t0

    first = results["settings"][0]
    print(f"\nthe notebook's network, batch {BATCH}, {TIME_STEPS} steps, {CHANNELS} channels, {TARGETS} target;")
    print(f"{args.rounds} alternating rounds of {args.seconds:g} s after {args.warmup:g} s warm-up, medians")
    for side in ("torch", "keras"):
        info = first[side]
        print(f"{side}: {info['framework']}; OpenMP waiting: {info['OpenMP waiting']}; libraries {info['libraries']}")
        for s in results["settings"]:
            print(f"    threads {s['threads']}: {s[side]['threads']}")
    print(
        f"trainable parameters: torch = Keras + 4 * lstm_units (PyTorch's LSTM has a second bias); "
        f"Keras XLA: {first['48x28']['keras_jit_compile']}; idle worker CPU during the other's rounds: "
        f"max {max(s[f'{h}x{w}']['idle_worker_cpu_s_max'] for s in results['settings'] for h, w in GRIDS):.2f} s"
    )
    print(f"both frameworks on {targets.describe_instruction_sets()}")
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    print(f"wall time {results['wall_seconds']:.0f} s\n")
    print(table(results))

    out = targets.write_results("keras_side_by_side", results, stamped=True)
    print(f"\nwritten {out.relative_to(REPO)}")

    if args.check:
        fair = [s for s in results["settings"] if s["threads"] == os.cpu_count()] or [
            s for s in results["settings"] if s["threads"] != "default"
        ]
        if not fair:
            print("--check needs a numeric thread setting (both frameworks limited to the same threads)")
            return 1
        missed = []
        for grid, floor in goals["keras_ratio_min"].items():
            ratio = fair[0][grid]["ratio"]
            line = f"at {grid} with {fair[0]['threads']} threads each, torch / Keras = {ratio:.2f} (>= {floor})"
            if ratio >= floor:
                print(f"met: {line}")
            else:
                missed.append(line)
        return targets.report(missed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
