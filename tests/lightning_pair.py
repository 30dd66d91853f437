"""Running the same code under Lightning Fabric and nbfabric, and recording which public members
of Lightning's API each differential test exercises (read by test_lightning_surface.py)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import nbfabric

lightning_fabric = pytest.importorskip("lightning.fabric", reason="the interop extra (lightning) is not installed")



class _LightningFabric(lightning_fabric.Fabric):
    """Lightning's Fabric, whose forked run is started once more when it hits Lightning's own start-up
    race: its rank 0 ends and exits while a peer still sets up its gloo connections, and the peer's
    init_process_group fails with 'Connection reset by peer'. (nbfabric's ranks wait for each other.)"""

    def __init__(self, **settings: Any):
        super().__init__(**settings)
        self._pair_settings = settings

    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return super().launch(function, *args, **kwargs)
        except torch.multiprocessing.ProcessRaisedException as error:
            if "Connection reset by peer" not in str(error) or "init_process_group" not in str(error):
                raise
        return lightning_fabric.Fabric.launch(type(self)(**self._pair_settings), function, *args, **kwargs)


FABRICS = {"lightning": _LightningFabric, "nbfabric": nbfabric.Fabric}
HELPERS = {  # what users import besides Fabric, from each
    "lightning": {"seed_everything": lightning_fabric.seed_everything, "is_wrapped": lightning_fabric.is_wrapped,
                  "rank_zero_only": lightning_fabric.utilities.rank_zero_only},
    "nbfabric": {"seed_everything": nbfabric.seed_everything, "is_wrapped": nbfabric.is_wrapped, "rank_zero_only": nbfabric.rank_zero_only},
}
COVERED: dict[str, list[str]] = {}  # Lightning member -> the differential tests that compare it


def covers(*members: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a differential test as comparing these members ("Fabric.setup", "_FabricModule.device", ...)."""

    def mark(test: Callable[..., Any]) -> Callable[..., Any]:
        for member in members:
            COVERED.setdefault(member, []).append(test.__name__)
        return test

    return mark


def run_both(function: Callable[..., Any], *args: Any, devices: int = 2, **settings: Any) -> dict[str, Any]:
    """`function(fabric, helpers, *args)` on `devices` forked CPU ranks under each framework; rank 0's result of each."""
    settings = {"accelerator": "cpu", "devices": devices, **({"strategy": "ddp_fork"} if devices > 1 else {}), **settings}
    return {name: cls(**settings).launch(function, HELPERS[name], *args) for name, cls in FABRICS.items()}


def same(results: dict[str, Any]) -> Any:
    """What both frameworks gave (`run_both`'s results), which must be equal."""
    assert results["nbfabric"] == results["lightning"]
    return results["nbfabric"]


def error_name(call: Callable[[], Any]) -> str:
    """The type of the error `call()` raises ("no error" if none): what is compared, not the wording."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the kind of error is what is compared
        return type(error).__name__
    return "no error"
