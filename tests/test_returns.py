"""Names a cell binds on rank 0 travel to the notebook exactly, or are named as not brought back."""

from __future__ import annotations

import sys
import textwrap
import threading

import pytest
import torch

from nbfabric.notebook.returns import LAST_VALUE, pack


def test_an_unpicklable_name_leaves_the_later_names_and_their_sharing_intact():
    shared = [1, 2, "x"]
    namespace = {"a": {"k": "v"}, "lock": threading.Lock(), "pair": [shared, shared], "gen": (i for i in "ab"), "c": [3.5, "s"]}
    returned = pack(namespace, ["a", "lock", "pair", "gen", "c"], {}, last_value=("last", shared))
    values = returned.load()
    assert set(returned.skipped) == {"lock", "gen"}
    assert "cannot be pickled" in returned.skipped["lock"]
    assert values["a"] == {"k": "v"} and values["c"] == [3.5, "s"]
    assert values["pair"] == [[1, 2, "x"], [1, 2, "x"]] and values["pair"][0] is values["pair"][1]
    assert values[LAST_VALUE] == ("last", [1, 2, "x"]) and values[LAST_VALUE][1] is values["pair"][0]


def test_a_model_and_its_optimizer_still_share_parameters_after_a_skipped_name():
    model = torch.nn.Linear(3, 2)
    namespace = {"model": model, "batches": (n for n in [1, 2]), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    returned = pack(namespace, ["model", "batches", "optimizer"], {})
    values = returned.load()
    assert list(returned.skipped) == ["batches"]
    assert values["optimizer"].param_groups[0]["params"][0] is values["model"].weight
    assert torch.equal(values["model"].weight, model.weight)


def test_a_name_that_cannot_load_in_the_notebook_takes_only_the_names_sharing_its_objects(tmp_path, monkeypatch):
    (tmp_path / "rank_only.py").write_text(textwrap.dedent("""
        class Box:
            def __init__(self, item):
                self.item = item
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import rank_only

    inner = ["inside the box"]
    namespace = {"before": "b", "box": rank_only.Box(inner), "alias": inner, "after": {"n": [1, 2]}, "again": "b"}
    returned = pack(namespace, list(namespace), {})
    monkeypatch.delitem(sys.modules, "rank_only")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    values = returned.load()
    assert "cannot be loaded in the notebook: ModuleNotFoundError" in returned.skipped["box"]
    assert returned.skipped["alias"] == "shares objects with box, which did not arrive"
    assert values == {"before": "b", "after": {"n": [1, 2]}, "again": "b"}


@pytest.mark.parametrize("failing", [0, 2, 4])
def test_every_position_of_a_failure_gives_the_same_values(failing):
    shared = {"deep": ["x", ("y", 3)]}
    values = [shared, [shared, "z"], "z", ("y", 3), shared["deep"]]
    names = [f"n{i}" for i in range(len(values))]
    namespace = dict(zip(names, values))
    namespace[names[failing]] = threading.Lock()
    returned = pack(namespace, names, {})
    loaded = returned.load()
    assert list(returned.skipped) == [names[failing]]
    for name in names:
        if name != names[failing]:
            assert loaded[name] == namespace[name]
