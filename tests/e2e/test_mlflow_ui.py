"""The MLflow UI as a person uses it, in a real browser (Debian's chromium and chromedriver, Selenium).

A two-run sweep of the tiny pipeline (two learning rates, the ``sweep`` grid) is run by the real
Snakemake; ``mlflow server`` serves its ``mlflow.db`` on 127.0.0.1. Then, as the README's
"Comparing runs" says: open the experiment's runs, see both runs, select both, Compare, find the
parameter that differs; in the chart view find the ``val_loss`` and ``test_rmse_*`` charts; open
one run's artifacts and see its evaluation plots; see the best run as the registered model's
``champion`` and load it the documented way (docs/tracking.md): its run's checkpoint
``checkpoints/best.pt`` through ``conv2dlstm.training.models.load_model``, weights only, no
unpickled code. (That the registered MLflow model also loads with ``mlflow.pytorch.load_model`` is
checked too, on the test's own store: it unpickles, so it is not the way to load a model from a
store you do not control.) Every step waits for what it needs on the page (a single-page app
renders late); screenshots (PNG) go to a directory the test prints, and are copied to
``$CONV2DLSTM_SCREENSHOTS`` when that is set.

Skipped, with the reason, only where chromium or chromedriver cannot be found.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.mlflow_server import MlflowServer
from tests.support.workflow import REPO, run_snakemake

TINY = REPO / "tests/configs/tiny.yaml"
EXPERIMENT = "ui-sweep"
RUNS = ("lr0.001", "lr0.003")
SCREENSHOTS_ENV = "CONV2DLSTM_SCREENSHOTS"
WAIT_S = 90


def _find(names: tuple[str, ...], fallbacks: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in fallbacks if Path(p).is_file() and os.access(p, os.X_OK)), None)


CHROMIUM = _find(("chromium", "chromium-browser", "google-chrome"), ("/usr/bin/chromium", "/usr/lib/chromium/chromium"))
CHROMEDRIVER = _find(("chromedriver",), ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"))

# Skipped before any fixture runs (the sweep takes a minute) where there is no browser to drive.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def sweep_workflow(tiny_run: Path, tmp_path_factory) -> Path:
    """A copy of the complete tiny pipeline in which a two-run sweep ran (the sweep grid form): its
    data steps are done, so only the two runs train, evaluate and compare."""
    wf = tmp_path_factory.mktemp("ui") / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiment"] = EXPERIMENT
    cfg["train"]["epochs"] = 2
    cfg["sweep"] = {"train.learning_rate": [0.001, 0.003]}
    cfg["mlflow"]["log_model"] = True  # the compare step registers the champion
    (wf / "ui.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_snakemake(wf, "--cores", "2", "--configfile", "ui.yaml")
    return wf


@pytest.fixture(scope="module")
def mlflow_ui(sweep_workflow: Path) -> Iterator[str]:
    """``mlflow server`` on the sweep's ``mlflow.db``; yields its base URL."""
    with MlflowServer(sweep_workflow, "sqlite:///mlflow.db") as server:
        yield server.url


@pytest.fixture
def browser() -> Iterator:
    """Headless chromium driven by chromedriver (Debian's), 1600 x 1000."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path, capsys) -> Iterator[Callable[[object, str], Path]]:
    """``shot(driver, name)`` saves ``<tmp>/screenshots/<name>.png``; the directory is printed, and
    copied to ``$CONV2DLSTM_SCREENSHOTS`` at the end when set."""
    folder = tmp_path / "screenshots"
    folder.mkdir()

    def shot(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), f"no screenshot {path}"
        return path

    try:
        yield shot
    finally:
        target = os.environ.get(SCREENSHOTS_ENV)
        if target:
            shutil.copytree(folder, target, dirs_exist_ok=True)
        with capsys.disabled():
            print(f"\nMLflow UI screenshots: {folder}" + (f" (copied to {target})" if target else ""))


def _experiment_id(wf: Path) -> str:
    with sqlite3.connect(wf / "mlflow.db") as db:
        (exp_id,) = db.execute("select experiment_id from experiments where name = ?", (EXPERIMENT,)).fetchone()
    return str(exp_id)


# ------------------------------------------------------------------------------------------------
# Page helpers: each waits for what it needs (WebDriverWait), never for a fixed time alone.


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        body = driver.find_element("tag name", "body").text[:3000]
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what} at {driver.current_url}; the page shows:\n{body}"
        ) from None


def _xpath_text(text: str) -> str:
    return f"//*[normalize-space(text())='{text}']"


def _visible(driver, xpath: str):
    found = [e for e in driver.find_elements("xpath", xpath) if e.is_displayed()]
    return found[0] if found else False


def _click(driver, element) -> None:
    """Click like a person; through JavaScript when another element (a tooltip) covers it."""
    from selenium.common.exceptions import ElementClickInterceptedException, ElementNotInteractableException

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    try:
        element.click()
    except (ElementClickInterceptedException, ElementNotInteractableException):
        driver.execute_script("arguments[0].click()", element)


def _close_assistant(driver) -> None:
    for button in driver.find_elements("css selector", "[data-component-id='mlflow.assistant.chat_panel.close']"):
        if button.is_displayed():
            _click(driver, button)


def _settled(driver, seconds: float = 1.0):
    """Let charts finish their first drawing before a screenshot: wait until the page's size of
    drawn SVG elements stops changing for ``seconds``."""
    state = {"last": None, "since": time.monotonic()}

    def stable(d) -> bool:
        count = d.execute_script("return document.querySelectorAll('svg *').length")
        if count != state["last"]:
            state["last"], state["since"] = count, time.monotonic()
        return time.monotonic() - state["since"] >= seconds

    _wait(driver, stable, "the page to finish drawing", timeout=30)


def _chart_cards(driver, title: str):
    """Chart cards of the chart view whose title is exactly ``title`` and that drew a plot."""
    cards = []
    for label in driver.find_elements("xpath", _xpath_text(title)):
        card = label
        for _ in range(8):  # up to the card that holds the plot
            card = card.find_element("xpath", "..")
            if card.find_elements("css selector", ".js-plotly-plot svg, svg.main-svg, canvas"):
                cards.append(card)
                break
    return cards


def _search_charts(driver, text: str) -> None:
    box = _wait(driver, lambda d: _visible(d, "//input[@placeholder='Search metric charts']"), "the chart search box")
    from selenium.webdriver.common.keys import Keys

    box.send_keys(Keys.CONTROL, "a")  # a React input: clear() would not tell the page
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


def test_compare_two_runs_in_the_mlflow_ui(
    sweep_workflow: Path, mlflow_ui: str, browser, screenshots, monkeypatch, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    from conv2dlstm.tracking.store import ui_address

    driver, base = browser, mlflow_ui
    exp_id = _experiment_id(sweep_workflow)

    # 1. The README's address (python -m conv2dlstm ui-address) opens the experiment on its training
    #    runs: both runs in the table.
    address = ui_address(f"sqlite:///{sweep_workflow}/mlflow.db", EXPERIMENT, base)
    assert address == f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    driver.get(address)
    for run in RUNS:
        _wait(driver, lambda d, r=run: _visible(d, f"//a[normalize-space()='{r}']"), f"run {run} in the runs table")
    _close_assistant(driver)
    assert "Comparing" not in driver.find_element(By.TAG_NAME, "body").text
    assert _visible(driver, "//*[normalize-space()='Model training']")
    screenshots(driver, "01-runs-table")

    # 2. Select both runs and compare them: the learning rate is the parameter that differs.
    boxes = _wait(
        driver,
        lambda d: (
            [b for b in d.find_elements(By.CSS_SELECTOR, "input[aria-label^='Press Space to toggle row selection']")]
            or False
        ),
        "row checkboxes",
    )
    assert len(boxes) == 2, "one selection box per run"
    for box in boxes:
        _click(driver, box)
    compare = _wait(
        driver,
        lambda d: (lambda b: b if b and b.is_enabled() else False)(
            _visible(d, "//button[@data-testid='runs-compare-button']")
        ),
        "the Compare button",
    )
    _click(driver, compare)
    _wait(driver, lambda d: _visible(d, "//*[contains(normalize-space(), 'Comparing 2 Runs')]"), "the compare page")
    for run in RUNS:
        _wait(driver, lambda d, r=run: _visible(d, _xpath_text(r)), f"run {run} on the compare page")
    _settled(driver)
    screenshots(driver, "02-compare-runs")
    # "Show diff only" of the Parameters section: the learning rate stays, parameters with one value go
    _click(
        driver,
        _wait(
            driver,
            lambda d: _visible(d, "//button[@role='switch' and @aria-label='Parameters - Show diff only']"),
            "the 'Show diff only' switch of the parameters",
        ),
    )
    row = _wait(
        driver,
        lambda d: _visible(d, "//tr[th[normalize-space()='train.learning_rate']]"),
        "the train.learning_rate row",
    )
    assert sorted(c.text for c in row.find_elements(By.TAG_NAME, "td")) == ["0.001", "0.003"], row.text
    _wait(
        driver,
        lambda d: not _visible(d, "//tr[th[normalize-space()='train.epochs']]"),
        "parameters with one value to be hidden",
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    screenshots(driver, "03-compare-parameter-that-differs")

    # 3. The chart view of the runs page (compare mode CHART): val_loss per epoch, test RMSE per lead.
    driver.get(f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning&compareRunsMode=CHART")
    _close_assistant(driver)
    _search_charts(driver, "val_loss")
    for title in ("val_loss", "best_val_loss"):
        _wait(driver, lambda d, t=title: _chart_cards(d, t) or False, f"the {title} chart")
    _settled(driver)
    screenshots(driver, "04-charts-val_loss")
    _search_charts(driver, "test_rmse_")
    for lead in (1, 2, 3):
        _wait(
            driver,
            lambda d, t=f"test_rmse_sst_lead{lead}": _chart_cards(d, t) or False,
            f"the test_rmse_sst_lead{lead} chart",
        )
    _settled(driver)
    screenshots(driver, "05-charts-test_rmse")

    # 4. One run's artifacts: the evaluation plots, shown as images.
    _click(driver, _wait(driver, lambda d: _visible(d, f"//a[normalize-space()='{RUNS[0]}']"), "the run link"))
    tab = _wait(
        driver,
        lambda d: _visible(
            d,
            "//*[@role='tab' and normalize-space()='Artifacts'] | "
            "//button[normalize-space()='Artifacts'] | //a[normalize-space()='Artifacts']",
        ),
        "the Artifacts tab",
    )
    _click(driver, tab)
    _close_assistant(driver)
    _click(driver, _wait(driver, lambda d: _visible(d, _xpath_text("evaluate")), "the evaluate folder"))
    for plot in ("rmse_vs_lead.png", "acc_vs_lead.png", "maps.png", "rmse_map.png"):
        _wait(driver, lambda d, p=plot: _visible(d, _xpath_text(p)), f"{plot} in the artifacts")
    _click(driver, _visible(driver, _xpath_text("rmse_vs_lead.png")))
    _wait(
        driver,
        lambda d: _visible(d, "//*[contains(normalize-space(text()), 'evaluate/rmse_vs_lead.png')]"),
        "the preview of evaluate/rmse_vs_lead.png",
    )
    image = _wait(
        driver,
        lambda d: (
            [
                i
                for i in d.find_elements(By.TAG_NAME, "img")
                if i.is_displayed()
                and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) > 300
            ]
            or False
        ),
        "the plot image",
    )[0]
    assert image.size["width"] > 300
    screenshots(driver, "06-run-artifacts-plot")

    # 5. The best run by validation loss is the registered model's champion, in the UI and in Python.
    driver.get(f"{base}/#/models/{EXPERIMENT}")
    _wait(
        driver,
        lambda d: _visible(d, "//*[contains(., 'champion') and not(*[contains(., 'champion')])]"),
        "the champion alias",
    )  # "@&nbsp;champion"
    _close_assistant(driver)
    screenshots(driver, "07-model-registry-champion")
    import mlflow.pytorch
    from mlflow import MlflowClient

    uri = f"sqlite:///{sweep_workflow}/mlflow.db"
    client = MlflowClient(uri)
    runs = client.search_runs([exp_id])
    best = min(runs, key=lambda r: r.data.metrics["best_val_loss"])
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").run_id == best.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test (set_tracking_uri exports it)
    mlflow.set_tracking_uri(uri)
    assert isinstance(mlflow.pytorch.load_model(f"models:/{EXPERIMENT}@champion"), torch.nn.Module)
    # the documented way (docs/tracking.md): the champion run's checkpoint, weights only, no pickle
    from conv2dlstm.training.models import load_model

    run_id = client.get_model_version_by_alias(EXPERIMENT, "champion").run_id
    path = client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path))
    model, ckpt = load_model(path)
    assert isinstance(model, torch.nn.Module) and ckpt["mlflow_run_id"] == best.info.run_id
