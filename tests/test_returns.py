"""Names a cell binds on rank 0 travel to the notebook exactly, or are named as not brought back."""

from __future__ import annotations

import sys
import textwrap
import types
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


@pytest.fixture
def notebook(monkeypatch):
    """A stand-in for the notebook's `__main__`: what a returned function reads as its globals."""
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    return vars(main)


def _cell_on_rank(source: str) -> dict:
    """The namespace a cell leaves on a rank: its names, defined in a module called __main__."""
    namespace = {"__name__": "__main__"}
    exec(textwrap.dedent(source), namespace)
    return namespace


def test_a_returned_function_reads_the_notebook_globals_as_a_cell_defined_function_does(notebook):
    rank = _cell_on_rank("""
        SCALE = 3
        def helper(x):
            return x * SCALE
    """)
    values = pack(rank, ["SCALE", "helper"], {}).load()
    notebook.update(values)
    assert notebook["helper"](2) == 6
    notebook["SCALE"] = 5
    assert notebook["helper"](2) == 10
    assert notebook["helper"].__globals__ is notebook
    assert notebook["helper"].__module__ == "__main__"


def test_a_returned_function_keeps_its_defaults_closure_attributes_and_may_call_itself(notebook):
    rank = _cell_on_rank('''
        def make(step, *, start=1):
            def count(n=start):
                """counts down"""
                return [] if n <= 0 else [n] + count(n - step)
            count.tag = "mine"
            return count
        countdown = make(2, start=5)
        def later():
            return unbound
        def closes_late():
            return value
        value = 7
    ''')
    values = pack(rank, ["countdown", "make", "closes_late"], {}).load()
    notebook.update(values)
    countdown = values["countdown"]
    assert countdown() == [5, 3, 1] and countdown(4) == [4, 2]
    assert countdown.tag == "mine" and countdown.__doc__ == "counts down" and countdown.__qualname__ == "make.<locals>.count"
    assert values["make"](1, start=2)() == [2, 1]
    with pytest.raises(NameError, match="value"):  # `value` did not come back: the notebook has none
        values["closes_late"]()


def test_a_returned_class_has_methods_that_read_the_notebook_globals_and_super_works(notebook):
    rank = _cell_on_rank("""
        import torch
        OFFSET = 1.0
        class Shifted(torch.nn.Linear):
            def __init__(self):
                super().__init__(2, 2)
            def forward(self, x):
                return super().forward(x) + OFFSET
        model = Shifted()
    """)
    values = pack(rank, ["OFFSET", "Shifted", "model"], {}).load()
    notebook.update(values)
    model, x = values["model"], torch.ones(1, 2)
    assert isinstance(model, values["Shifted"])
    base = torch.nn.functional.linear(x, model.weight, model.bias)
    assert torch.equal(model(x), base + 1.0)
    notebook["OFFSET"] = 10.0
    assert torch.equal(model(x), base + 10.0)
    assert isinstance(values["Shifted"](), values["Shifted"])


def test_a_function_the_notebook_already_had_comes_back_as_itself(notebook):
    def existing(x):
        return x

    existing.__module__, existing.__qualname__ = "__main__", "existing"  # as a notebook cell defines it
    notebook["existing"] = existing
    rank = {"__name__": "__main__", "existing": existing, "alias": existing}
    values = pack(rank, ["alias"], known={"existing": existing}).load()
    assert values["alias"] is existing


def test_tensors_that_share_a_storage_in_the_rank_share_it_in_the_notebook():
    """As with Lightning's launch (torch.multiprocessing), where plain pickling would copy each."""
    base = torch.arange(10.0)
    model = torch.nn.Linear(2, 2)
    namespace = {"base": base, "middle": base[2:5], "both": [base[:3], base[7:]], "model": model, "weight": model.weight}
    values = pack(namespace, list(namespace), {}).load()
    storage = values["base"].untyped_storage().data_ptr()
    assert values["middle"].untyped_storage().data_ptr() == storage and values["middle"].storage_offset() == 2
    assert all(view.untyped_storage().data_ptr() == storage for view in values["both"])
    values["middle"].add_(100)
    assert values["base"].tolist() == [0, 1, 102, 103, 104, 5, 6, 7, 8, 9]  # the notebook's view writes into its base, as in the rank
    assert values["weight"] is values["model"].weight
    assert torch.equal(values["both"][1], torch.arange(7.0, 10.0))
