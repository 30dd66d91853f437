"""Every public member of Lightning Fabric's API that users touch is classified here as supported,
differs (with the reason) or refused, each supported or differing one is compared by a
differential test, and the README lists every difference."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import test_lightning_compat  # noqa: F401 - fills COVERED
import test_lightning_members  # noqa: F401 - fills COVERED
from lightning_pair import COVERED, lightning_fabric

SUPPORTED = "supported"
SURFACE = {
    **{f"Fabric.{name}": SUPPORTED for name in (
        "all_gather", "all_reduce", "autocast", "backward", "barrier", "broadcast", "call", "clip_gradients", "device", "global_rank",
        "init_module", "init_tensor", "is_global_zero", "load", "load_raw", "local_rank", "log", "log_dict",
        "logger", "loggers", "no_backward_sync", "node_rank", "print", "rank_zero_first", "run", "save", "seed_everything",
        "setup", "setup_dataloaders", "setup_module", "setup_optimizers", "strategy", "to_device", "world_size",
    )},
    "Fabric.accelerator": "differs: a small object whose `name()` is 'cpu', 'cuda' or 'mps'; Lightning's accelerator classes are not used",
    "Fabric.launch": "differs: in a script, `launch(fn)` runs `fn` in forked ranks and returns rank 0's value; the calling "
                     "process is not rank 0, so code after it runs once and the caller's model is not the trained one. Return "
                     "what you need from `fn`, or call a bare `fabric.launch()`, after which the rest of the script runs on every rank",
    "Fabric.sharded_model": "differs: deprecated as in Lightning; modules are built as usual and sharded by `setup`",
    **{f"_FabricModule.{name}": SUPPORTED for name in (
        "__setattr__", "cpu", "cuda", "device", "double", "float", "forward", "half", "load_state_dict",
        "mark_forward_method", "module", "state_dict", "to", "type",
    )},
    "_FabricModule.__getattr__": "differs: a method that runs the model's layers works unmarked when gradients are off "
                                 "(`torch.no_grad`, `inference_mode`, as in `generate`); Lightning raises",
    "_FabricModule.dtype": "differs: the dtype of the module's parameters (bfloat16 under bf16-true); Lightning reports the "
                           "default dtype until the module is converted with `.to()`",
    **{f"_FabricOptimizer.{name}": SUPPORTED for name in ("__getattr__", "load_state_dict", "optimizer", "state_dict", "step")},
    **{f"_FabricDataLoader.{name}": SUPPORTED for name in ("__iter__", "__len__", "device")},
    "seed_everything": SUPPORTED,
    "is_wrapped": SUPPORTED,
    "rank_zero_only": SUPPORTED,
    "loggers.CSVLogger": SUPPORTED,
    "loggers.TensorBoardLogger": "refused: nbfabric has no logger classes of its own; Lightning's logger objects (and any "
                                 "object with `log_metrics`) are passed as `loggers=` and used as they are",
}
_DUNDERS = ("__getattr__", "__setattr__", "__iter__", "__len__")  # behaviour users rely on through attribute access and loops


def lightning_surface() -> set[str]:
    """The public members of Lightning's Fabric and its wrappers (overrides of torch's own classes
    included), and the helpers users import beside it."""
    from lightning.fabric import Fabric, loggers, wrappers

    members = set()
    for prefix, cls, base in (("Fabric", Fabric, object), ("_FabricModule", wrappers._FabricModule, torch.nn.Module),
                              ("_FabricOptimizer", wrappers._FabricOptimizer, object), ("_FabricDataLoader", wrappers._FabricDataLoader, object)):
        names = {name for name in dir(cls) if not name.startswith("_") and name not in dir(base)}
        for klass in cls.__mro__:
            if klass in (base, object):
                break
            names |= {name for name in vars(klass) if not name.startswith("_") or name in _DUNDERS}
        members |= {f"{prefix}.{name}" for name in names}
    members |= {name for name in ("seed_everything", "is_wrapped") if hasattr(lightning_fabric, name)}
    members.add("rank_zero_only")
    members |= {f"loggers.{name}" for name in dir(loggers) if name[0].isupper() and name != "Logger"}
    return members


def test_every_public_member_of_lightning_is_classified():
    unclassified = sorted(lightning_surface() - SURFACE.keys())
    assert not unclassified, f"Lightning has public members not classified in SURFACE: {unclassified}"


def test_every_classification_names_a_real_lightning_member_and_a_known_status():
    assert not sorted(SURFACE.keys() - lightning_surface())
    assert all(status == SUPPORTED or status.startswith(("differs: ", "refused: ")) for status in SURFACE.values())


def test_every_supported_or_differing_member_is_compared_by_a_differential_test():
    compared = {member for member, status in SURFACE.items() if not status.startswith("refused")}
    assert not sorted(compared - COVERED.keys()), "members without a differential test"
    assert not sorted(COVERED.keys() - SURFACE.keys()), "tests claim to cover members that are not in SURFACE"


def readme_differences() -> str:
    """The README's list of differences, as SURFACE gives it."""
    lines = [f"- `{member}`: {status}" for member, status in SURFACE.items() if status != SUPPORTED]
    return "\n".join(lines)


def test_the_readme_lists_every_difference_and_refusal():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    found = re.search(r"<!-- lightning-differences -->\n(.*?)\n<!-- /lightning-differences -->", readme, re.S)
    assert found, "README.md has no <!-- lightning-differences --> section"
    assert found.group(1) == readme_differences(), "README.md's differences section is out of date; it should read:\n" + readme_differences()
