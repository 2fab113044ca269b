"""Conv2D-LSTM: forecasting gridded ocean fields with Conv2D + LSTM networks.

Data flow (one module per stage, each a set of small pure functions plus one entry point that the
command line in :mod:`conv2dlstm.cli` calls):

    synthetic -> fetch -> harmonize/regrid -> normalize -> windows -> train -> evaluate

Dimensions are ``time, lat, lon`` everywhere after :func:`conv2dlstm.data.harmonize.harmonize`; tensors
are ``(batch, time, channel, lat, lon)``.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work spin briefly, then sleep. torch's CPU kernels run on GNU OpenMP,
# whose default is to spin for about 300,000 rounds: on a CPU shared with another busy process (a
# second training job, a Dask worker, a login node) the spinning threads take the cores from the
# threads with work, and training slowed to a fifth of its speed. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE alone) keeps the fair share but costs up to half the speed of a step made
# of many short kernels on an idle machine; 1,000 rounds of spinning keep both (bench/shared_cpu.py,
# docs/performance.md). Read once when torch loads, so it is set here, before any step imports torch;
# an environment that sets either variable wins, untouched.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
if not any(name in os.environ for name in OPENMP_WAIT):
    os.environ.update(OPENMP_WAIT)


def openmp_waiting() -> str:
    """How this process's OpenMP threads wait, as its environment says (for benchmark reports)."""
    return " ".join(f"{name}={os.environ.get(name, 'unset')}" for name in OPENMP_WAIT)
