"""The pipeline's on-disk artifacts, one module each, each the only owner of its contract.

A module names what the artifact holds, its ``FORMAT_VERSION``, and the functions that write,
open and validate it; every reader goes through it and so checks the format version. Steps import
artifacts, never each other, but for the on-demand forecast step (the layout of each artifact
and the exception: ``docs/architecture.md``).

- :mod:`.checkpoint`: the training checkpoints (``<outdir>/train/<run>/{last,best,model}.pt``),
  written by the train step, read by train (resume), evaluate and forecast (the model alone).
- :mod:`.manifest`: the fetch manifest (``<resources_dir>/raw/<name>/manifest.json``), written by the
  fetch step, read by regrid and forecast (through :mod:`conv2dlstm.data.sources`).
- :mod:`.predictions`: the test-period forecasts (``<outdir>/evaluate/<run>/predictions.{nc,zarr}``,
  CF, WeatherBench 2 layout), written by the evaluate step; its reader opens them and the forecast
  step's outputs alike, for the summary, the tests and users.
- :mod:`.regridded`: the regridded store (``<outdir>/regrid/<name>.zarr``), written by the regrid
  step, read by normalize and windows.
- :mod:`.stats`: the normalization statistics (``<outdir>/normalize/<name>.nc``), written by the
  normalize step, read by windows, train, evaluate and forecast.
- :mod:`.windows_store`: the windows store (``<outdir>/windows/<name>.zarr``), written by the
  windows step, read by train, evaluate and forecast (:class:`~.windows_store.WindowsStore`).
"""
