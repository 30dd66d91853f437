"""`RankPool`: ranks that keep their state between runs, and run functions on them."""

from __future__ import annotations

from typing import Any

from nbfabric.fabric import Fabric
from nbfabric.pool.cluster import EngineCluster
from nbfabric.pool.launcher import PoolLauncher


class RankPool(EngineCluster):
    """Ranks that keep their state between runs. ``RankPool(devices=2)`` starts two local engines;
    ``engines="slurm"`` asks Slurm for them (``partition``, ``time``); ``RankPool.attach(profile=...)``
    takes engines started with ``ipcluster``. ``pool.launch(fn)`` runs ``fn(fabric)`` on every rank."""

    def launch(self, function: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``function(fabric, *args, **kwargs)`` on every rank (a Fabric of the pool's settings).

        Returns:
            Rank 0's value, on the CPU.

        Raises:
            PoolError: the pool is stopped or broken. RankError, RankTimeoutError: as `Fabric.launch`.
        """
        fabric = Fabric.from_config(self.config, timeout=timeout)
        return fabric._launch(function, args, kwargs, launcher=PoolLauncher(self, timeout=timeout))
