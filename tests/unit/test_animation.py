"""The test period's animation (conv2dlstm.evaluation.animation): frames, their size, colour limits fixed
over all frames, land grey, cells without a score hatched; the configuration key that turns it off."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError
from conv2dlstm.evaluation import animation

LAND_GREY = (204, 204, 204)  # plots.LAND_COLOR "0.8"


def test_frame_indices_take_an_even_stride_with_both_ends():
    np.testing.assert_array_equal(animation.frame_indices(5, 120), np.arange(5))
    np.testing.assert_array_equal(animation.frame_indices(5, 0), np.arange(5))  # 0: every initial time
    np.testing.assert_array_equal(animation.frame_indices(9, 3), [0, 4, 8])
    picked = animation.frame_indices(1000, 120)
    assert picked.size == 120 and picked[0] == 0 and picked[-1] == 999
    assert np.ptp(np.diff(picked)) <= 1  # an even stride
    assert animation.frame_indices(0, 10).size == 0


def _frames(n: int, lat: np.ndarray, lon: np.ndarray, ocean: np.ndarray):
    """``n`` frames of two variables whose range grows from frame to frame, but for one cell of constant
    truth and forecast; land NaN, one ocean cell NaN throughout (no score)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        truth = rng.normal(20.0, 1.0 + k, (2, lat.size, lon.size))
        forecast = truth + rng.normal(0.0, 0.5 + k, truth.shape)
        truth[:, 2, 3], forecast[:, 2, 3] = 20.0, 20.4  # the constant cell
        truth[:, 4, 1] = forecast[:, 4, 1] = np.nan  # ocean without a value
        truth[:, ~ocean] = forecast[:, ~ocean] = np.nan
        out.append((truth, forecast))
    return out


def _rgb_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    return frames


def test_animation_frames_size_fixed_colours_land_and_no_score(tmp_path):
    lat, lon = np.arange(30.0, 36.0), np.arange(-70.0, -62.0)  # ascending: north up in the frames
    ocean = np.ones((lat.size, lon.size), bool)
    ocean[0, 0] = ocean[5, 7] = False
    frames = _frames(6, lat, lon, ocean)
    reads = []

    def read():
        reads.append(1)
        return iter(frames)

    path = tmp_path / "animation.gif"
    titles = [f"run: lead 1 (1 day), initialized 2021-01-0{k + 1}, valid 2021-01-0{k + 2}" for k in range(6)]
    limits = animation.write_animation(
        path, read, titles=titles, variables=["sst", "no3"], units={"sst": "degC"}, ocean=ocean, lat=lat
    )
    assert len(reads) == 2  # one pass for the limits, one to draw: the maps are not kept
    truth_all = np.stack([t for t, _ in frames])[:, 0][:, ocean]
    lo, hi = np.nanpercentile(truth_all, [2, 98])
    assert limits.field["sst"] == pytest.approx((lo, hi))
    assert limits.error["sst"] > 0

    rgb = _rgb_frames(path)
    lay = animation.layout(2, lat.size, lon.size, title_lines=1)
    assert len(rgb) == 6
    width, height = rgb[0].shape[1], rgb[0].shape[0]
    assert all(f.shape == rgb[0].shape for f in rgb)
    assert width == lay.size[0] and height >= lay.size[1]
    lay = animation.layout(2, lat.size, lon.size, title_lines=(height - lay.size[1]) // 13 + 1)
    assert (width, height) == lay.size

    def colour(frame: np.ndarray, row: int, panel: int, i: int, j: int) -> tuple[int, ...]:
        x, y = lay.cell_pixel(row, panel, i, j)
        return tuple(int(c) for c in frame[y, x])

    for row in (0, 1):
        for panel in (0, 1, 2):
            constant = {colour(f, row, panel, 2, 3) for f in rgb}
            assert len(constant) == 1, (row, panel, constant)  # the same value, the same colour in every frame
            for i, j in ((0, 0), (5, 7)):
                assert {colour(f, row, panel, i, j) for f in rgb} == {LAND_GREY}, (row, panel, i, j)
            x0, y0 = lay.cell_pixel(row, panel, 4, 1)
            half = lay.cell // 2
            block = {tuple(c) for f in rgb for c in f[y0 - half : y0 + half, x0 - half : x0 + half].reshape(-1, 3)}
            assert (255, 255, 255) in block and len(block) == 2 and LAND_GREY not in block  # hatched
    varying = {colour(f, 0, 0, 3, 5) for f in rgb}
    assert len(varying) > 1  # a cell whose value changes does change colour


def test_animation_lead_is_checked_against_the_leads_scored():
    assert validate_config({})["evaluate"]["animation_lead"] == 1
    assert validate_config({"evaluate": {"animation_lead": 0}})["evaluate"]["animation_lead"] == 0
    cfg = validate_config({"windows": {"lead_steps": 2}, "evaluate": {"max_lead": 4, "animation_lead": 4}})
    assert cfg["evaluate"]["animation_lead"] == 4
    with pytest.raises(ConfigError, match=r"evaluate.animation_lead: 3 is past the last lead scored, 2"):
        validate_config({"windows": {"lead_steps": 2}, "evaluate": {"animation_lead": 3}})
