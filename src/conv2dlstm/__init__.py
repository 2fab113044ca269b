"""Conv2D-LSTM: forecasting gridded ocean fields with Conv2D + LSTM networks.

Data flow (one module per stage, each a set of small pure functions plus one entry point that the
command line in :mod:`conv2dlstm.cli` calls):

    synthetic -> fetch -> harmonize/regrid -> normalize -> windows -> train -> evaluate

Dimensions are ``time, lat, lon`` everywhere after :func:`conv2dlstm.harmonize.harmonize`; tensors
are ``(batch, time, channel, lat, lon)``.
"""

__version__ = "0.1.0"
