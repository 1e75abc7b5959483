"""One registry mechanism for every extension point: each registered modality and source keeps its contract (tasks,
objectives and fusions are tested the same way in their own files), and a name is one class's."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

from mmlit.cli import main
from mmlit.data import Shards, Source, TaskData
from mmlit.modalities import Modality
from mmlit.registry import (get_modality, get_source, list_fusions, list_modalities, list_sources, register_fusion,
                            register_modality)


@pytest.mark.parametrize("name", list_modalities())
def test_every_registered_modality_keeps_its_contract(name):
    cls = get_modality(name)
    assert issubclass(cls, Modality) and cls.modality_name == name and cls.extensions
    module, _, attr = cls.default_encoder.rpartition(".")
    encoder = getattr(importlib.import_module(module), attr)(dim=32)  # the encoder a backbone builds by default
    assert encoder.dim == 32 and isinstance(encoder, torch.nn.Module)
    modality = cls()
    pipeline = modality.pipeline(encoder, None, "model.tasks.t.init_args")
    assert callable(pipeline) and callable(modality.collate)


@pytest.mark.parametrize("name", list_sources())
def test_every_registered_source_keeps_its_contract(name):
    cls = get_source(name)
    assert issubclass(cls, Source) and cls.format == name
    for method in ("count", "read"):
        assert getattr(cls, method) is not getattr(Source, method), f"{name} implements {method}"


def test_a_name_is_one_classs():
    @register_fusion("registry_test_once")
    class First(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="fusion name 'registry_test_once' is taken by .*First"):
        @register_fusion("registry_test_once")
        class Second(torch.nn.Module):
            pass

    assert "registry_test_once" in list_fusions()


@pytest.mark.parametrize("kind,names", [("modalities", ["image", "text"]), ("sources", ["tar"]),
                                        ("fusions", ["cross_attention", "early", "hybrid", "late", "relation_network"])])
def test_mmlit_lists_what_is_registered(kind, names, capsys):
    assert main([kind]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert set(names) <= set(listed)


_IMPORT_EACH_FIRST = """
import importlib, json, pkgutil, sys
import mmlit
names = sorted(m.name for m in pkgutil.walk_packages(mmlit.__path__, "mmlit."))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "mmlit" or m.startswith("mmlit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
    if name == "mmlit.data":
        print("DATA_LOADS", json.dumps(sorted({m.split(".")[1] for m in sys.modules if m.startswith("mmlit.")})))
print("FAILED", json.dumps(failed))
print("COUNT", len(names))
"""


def test_every_module_imports_first_and_the_data_side_needs_no_model():
    """Each module of mmlit imports in an interpreter where no other mmlit module is loaded yet (an import cycle
    shows up only for the module imported first), and ``mmlit.data`` (what DataLoader workers load) pulls in
    neither the tasks' heads nor the models."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0] in {"FAILED", "COUNT", "DATA_LOADS"})
    assert int(lines["COUNT"]) > 50
    assert json.loads(lines["FAILED"]) == []
    data_loads = json.loads(lines["DATA_LOADS"])
    assert "data" in data_loads and "tasks" not in data_loads and "models" not in data_loads, data_loads


def test_a_task_collates_a_modalitys_values_with_that_modalitys_collate():
    """Values keyed by a modality the data side reads are batched by the modality (here: summed, not stacked); the
    rest as ``collate_examples`` does."""
    @register_modality("registry_test_counts")
    class Counts(Modality):
        extensions = frozenset({"counts"})

        def collate(self, values: list) -> torch.Tensor:
            return torch.stack(values).sum(0)

    class CountsData(TaskData):
        reads = ("registry_test_counts",)

    examples = [{"registry_test_counts": torch.tensor([1, 2]), "label": 0},
                {"registry_test_counts": torch.tensor([3, 4]), "label": 1}]
    batch = CountsData(Shards()).collate(examples)
    assert batch["registry_test_counts"].tolist() == [4, 6] and batch["label"].tolist() == [0, 1]
