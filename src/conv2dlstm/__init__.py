"""Conv2D-LSTM: forecasting gridded ocean fields with Conv2D + LSTM networks.

Data flow (one module per stage, each a set of small pure functions plus one entry point that the
command line in :mod:`conv2dlstm.cli` calls):

    synthetic -> fetch -> harmonize/regrid -> normalize -> windows -> train -> evaluate

Dimensions are ``time, lat, lon`` everywhere after :func:`conv2dlstm.data.harmonize.harmonize`; tensors
are ``(batch, time, channel, lat, lon)``.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work sleep instead of spinning. torch's CPU kernels run on GNU OpenMP,
# whose default is to spin: on a CPU shared with another busy process (a second training job, a
# Dask worker, a login node) the spinning threads take the cores from the threads with work, and
# training slowed to a fraction of its fair share (bench/shared_cpu.py, docs/performance.md). Read
# once when torch loads, so it is set here, before any step imports torch; the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
