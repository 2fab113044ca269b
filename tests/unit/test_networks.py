"""The network contract (tests/support/network_contract.py), every check on every registered network,
and the whole contract on a throwaway network registered for the test alone."""

from __future__ import annotations

import pytest
import torch

from conv2dlstm.config import networks
from conv2dlstm.config.schema import load_schema, network_sections
from conv2dlstm.config.sweep import LABELS
from conv2dlstm.errors import ConfigError
from conv2dlstm.training import models
from tests.support.network_contract import CHECKS, THROWAWAY


@pytest.fixture(autouse=True)
def _one_thread_no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", networks.NETWORKS)
def test_contract(name: str, check: str, tmp_path) -> None:
    CHECKS[check](name, tmp_path)


def test_a_new_network_needs_its_module_and_its_registry_entry_only(monkeypatch, tmp_path) -> None:
    """A network registered in a temporary registry passes the whole contract with no other edit,
    and what lists networks (models, sweep labels) derives from the registry."""
    monkeypatch.setitem(networks.NETWORKS, THROWAWAY.name, THROWAWAY)
    assert THROWAWAY.name in models.model_names()
    for check, run in CHECKS.items():
        (tmp_path / check).mkdir()
        run(THROWAWAY.name, tmp_path / check)
    with pytest.raises(ConfigError, match=r"\['throwaway'\] are registered .* no \$defs section"):
        network_sections(load_schema())  # and the schema names what the new network still lacks


def test_everything_that_lists_networks_follows_the_registry() -> None:
    schema = load_schema()
    model = schema["$defs"]["model"]
    assert model["properties"]["name"]["enum"] == list(networks.NETWORKS)
    assert set(model["properties"]) == {"name", *networks.NETWORKS}
    for name, net in networks.NETWORKS.items():
        section = schema["$defs"][name]
        assert section.get("description"), name
        assert set(net.small) <= set(section["properties"]), (name, "small has keys the schema lacks")
        for key, label in net.labels.items():
            assert key in section["properties"] and LABELS[f"model.{name}.{key}"] == label
    labels = [label for n in networks.NETWORKS.values() for label in n.labels.values()]
    assert len(labels) == len(set(labels)), "two networks share a sweep label"


def test_unknown_network_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"'resnet' is not one of the registered networks \['convlstm'"):
        models.build_model("resnet", in_channels=1)
