"""One changed value per configuration key, and what a rerun must plan for it: the table the rerun
tests take their cases from (tests/unit/test_workflow.py: every key's rule params; tests/e2e/test_rerun.py:
the real Snakemake's dry run, one key per kind of plan)."""

from __future__ import annotations

import yaml

from tests.support.workflow import REPO

TINY = REPO / "tests/configs/tiny.yaml"

# One changed value per schema key (a mapping merged over the tiny config). A key that needs a
# companion change to stay valid carries it; the expectation is the key's own.
CHANGES: dict[str, dict] = {
    "experiment": {"experiment": "another"},
    "name": {"name": "other"},
    "outdir": {"outdir": "results2"},
    "resources_dir": {"resources_dir": "resources2"},
    "synthetic.kind": {"synthetic": {"kind": "cmems_bgc"}},
    "synthetic.start": {"synthetic": {"start": "2019-01-02"}},
    "synthetic.end": {"synthetic": {"end": "2019-06-29"}},
    "synthetic.lat": {"synthetic": {"lat": [30.375, 34.875]}},
    "synthetic.lon": {"synthetic": {"lon": [290.375, 294.875]}},
    "synthetic.resolution": {"synthetic": {"resolution": 0.5}},
    "synthetic.seed": {"synthetic": {"seed": 1}},
    "source.kind": {"source": {"kind": "files"}},
    "source.url": {
        "source": {"url": "file:./resources/synthetic/oisst/{date:%Y%m}/oisst-avhrr-v02r01.{date:%Y%m%d}.nc"}
    },
    "source.start": {"source": {"start": "2019-01-02"}},
    "source.end": {"source": {"end": "2019-06-29"}},
    "source.frequency": {"source": {"frequency": "1D"}},
    "source.paths": {"source": {"paths": ["elsewhere/*.nc"]}},
    "source.store": {"source": {"store": "elsewhere.zarr"}},
    "source.dataset_id": {"source": {"dataset_id": "cmems_mod_glo_bgc"}},
    "source.checksums": {"source": {"checksums": {"oisst-avhrr-v02r01.20190101.nc": "0" * 64}}},
    "source.max_missing": {"source": {"max_missing": 2}},
    "source.parallel": {"source": {"parallel": 2}},
    "source.retries": {"source": {"retries": 5}},
    "source.backoff_s": {"source": {"backoff_s": 2.0}},
    "source.timeout_s": {"source": {"timeout_s": 10}},
    "harmonize.level": {"harmonize": {"level": 1}},
    "harmonize.lon_convention": {
        "harmonize": {"lon_convention": "0..360"},
        "grid": {"lon": {"start": 290.5, "stop": 294.5, "step": 1.0}},
    },
    "harmonize.rename": {"harmonize": {"rename": {"analysed_sst": "sst"}}},
    "harmonize.duplicates": {"harmonize": {"duplicates": "first"}},
    "harmonize.fill_max_days": {"harmonize": {"fill_max_days": 3}},
    "harmonize.max_land_from_gaps": {"harmonize": {"max_land_from_gaps": 0.2}},
    "harmonize.units": {"harmonize": {"units": {"sst": {"max": 35.0}}}},
    "region.lat": {"region": {"lat": [30.0, 35.0]}},
    "region.lon": {"region": {"lon": [-70.0, -65.0]}},
    "grid.method": {"grid": {"method": "linear"}},
    "grid.lat": {"grid": {"lat": {"start": 30.5, "stop": 33.5, "step": 1.0}}},
    "grid.lon": {"grid": {"lon": {"start": -69.5, "stop": -66.5, "step": 1.0}}},
    "grid.min_ocean_fraction": {"grid": {"min_ocean_fraction": 0.6}},
    "variables.inputs": {"variables": {"inputs": ["sst", "sss"]}},
    "variables.targets": {"variables": {"targets": ["sss"]}},
    "variables.nonnegative": {"variables": {"nonnegative": ["sst"]}},
    "splits.train": {"splits": {"train": {"start": "2019-01-02", "end": "2019-04-15"}}},
    "splits.val": {"splits": {"val": {"start": "2019-04-16", "end": "2019-05-19"}}},
    "splits.test": {"splits": {"test": {"start": "2019-05-21", "end": "2019-06-29"}}},
    "normalize.per_pixel": {"normalize": {"per_pixel": True}},
    "normalize.climatology_window": {"normalize": {"climatology_window": 15}},
    "windows.input_steps": {"windows": {"input_steps": 4}},
    "windows.lead_steps": {"windows": {"lead_steps": 2}},
    "windows.stride": {"windows": {"stride": 2}},
    "windows.time_chunk": {"windows": {"time_chunk": 16}},
    "dask.scheduler_address": {"dask": {"scheduler_address": "tcp://127.0.0.1:9"}},
    "model.name": {"model": {"name": "conv2d_lstm", "conv2d_lstm": {"filters": [8]}}},  # one block fits 5x5
    "model.conv2d_lstm.filters": {"model": {"conv2d_lstm": {"filters": [8]}}},
    "model.conv2d_lstm.kernel_size": {"model": {"conv2d_lstm": {"kernel_size": 5}}},
    "model.conv2d_lstm.lstm_units": {"model": {"conv2d_lstm": {"lstm_units": 8}}},
    "model.conv2d_lstm.dense_units": {"model": {"conv2d_lstm": {"dense_units": 8}}},
    "model.conv2d_lstm.max_parameters": {"model": {"conv2d_lstm": {"max_parameters": 1000000}}},
    "model.convlstm.hidden_channels": {"model": {"convlstm": {"hidden_channels": [2]}}},
    "model.convlstm.kernel_size": {"model": {"convlstm": {"kernel_size": 5}}},
    "model.unet.features": {"model": {"unet": {"features": [4, 8]}}},
    "model.unet.kernel_size": {"model": {"unet": {"kernel_size": 5}}},
    "model.simvp.spatial_channels": {"model": {"simvp": {"spatial_channels": 8}}},
    "model.simvp.temporal_channels": {"model": {"simvp": {"temporal_channels": 16}}},
    "model.simvp.spatial_layers": {"model": {"simvp": {"spatial_layers": 4}}},
    "model.simvp.temporal_layers": {"model": {"simvp": {"temporal_layers": 2}}},
    "model.simvp.inception_kernels": {"model": {"simvp": {"inception_kernels": [3, 5]}}},
    "model.simvp.groups": {"model": {"simvp": {"groups": 2}}},
    "train.epochs": {"train": {"epochs": 3}},
    "train.batch_size": {"train": {"batch_size": 4}},
    "train.learning_rate": {"train": {"learning_rate": 0.0005}},
    "train.weight_decay": {"train": {"weight_decay": 0.001}},
    "train.lr_schedule": {"train": {"lr_schedule": "constant"}},
    "train.grad_clip": {"train": {"grad_clip": 0.5}},
    "train.patience": {"train": {"patience": 2}},
    "train.seed": {"train": {"seed": 1}},
    "train.device": {"train": {"device": "cpu"}},
    "train.bf16": {"train": {"bf16": False}},
    "train.compile": {"train": {"compile": True}},
    "train.latitude_weighted_loss": {"train": {"latitude_weighted_loss": True}},
    "train.num_workers": {"train": {"num_workers": 1}},
    "train.data_on_device": {"train": {"data_on_device": "never"}},
    "train.gpus": {"train": {"gpus": 2}},
    "train.max_batches_per_epoch": {"train": {"max_batches_per_epoch": 2}},
    "mlflow.tracking_uri": {"mlflow": {"tracking_uri": "sqlite:///other.db"}},
    "mlflow.log_model": {"mlflow": {"log_model": True}},
    "evaluate.plot_date": {"evaluate": {"plot_date": "2019-05-25"}},
    "evaluate.batch_size": {"evaluate": {"batch_size": 4}},
    "evaluate.max_lead": {"evaluate": {"max_lead": 6}},
    "evaluate.regions": {"evaluate": {"regions": {"north": {"lat": [32.0, 35.0]}}}},
    "evaluate.by_season": {"evaluate": {"by_season": "season"}},
    "evaluate.animation_lead": {"evaluate": {"animation_lead": 2}},
    "evaluate.animation_frames": {"evaluate": {"animation_frames": 10}},
    "evaluate.events.variables": {"evaluate": {"events": {"variables": ["sst"]}}},
    "evaluate.events.quantile": {"evaluate": {"events": {"quantile": 0.95}}},
    "evaluate.events.min_duration_days": {"evaluate": {"events": {"min_duration_days": 5}}},
    "evaluate.events.min_training_years": {"evaluate": {"events": {"min_training_years": 3}}},
    "evaluate.events.smooth_days": {"evaluate": {"events": {"smooth_days": 1}}},
}

# Keys whose change alone validation refuses under the tiny config (kind url); the refusal names the key.
REFUSED: dict[str, dict] = {
    "source.variables": {"source": {"variables": ["sst"]}},  # read by kinds zarr and copernicus only
}

# Run entries, which override model and train keys per run (the tiny config has one implicit run,
# named after model.name): (runs, steps planned).
RUN_CHANGES = {
    "same run, listed": ([{"name": "convlstm"}], set()),
    "runtime override": ([{"name": "convlstm", "train": {"num_workers": 1, "device": "cpu"}}], set()),
    "inactive architecture": ([{"name": "convlstm", "model": {"conv2d_lstm": {"filters": [8]}}}], set()),
    "result override": ([{"name": "convlstm", "train": {"epochs": 3}}], {"train", "evaluate", "compare"}),
    # a second run that differs only in train.seed: the two are an ensemble (conv2dlstm.config.ensembles)
    "second run": (
        [{"name": "convlstm"}, {"name": "b", "train": {"seed": 1}}],
        {"train", "evaluate", "ensemble", "compare"},
    ),
}

# The sweep grid, which validation expands into runs entries named from their values: (sweep, steps planned).
SWEEP_CHANGES = {
    "one point, the run itself": ({"model.name": ["convlstm"]}, set()),
    "two learning rates": ({"train.learning_rate": [0.003, 0.001]}, {"train", "evaluate", "compare"}),
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())
