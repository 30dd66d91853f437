"""Rank pools: ranks that outlive a run (ipyparallel engines, started here or by its Slurm, MPI or
SSH launchers), their launcher, and the engines' side of a run."""

from nbfabric.pool.cluster import ENGINE_KINDS, PoolError, RankPool
from nbfabric.pool.launcher import PoolLauncher

__all__ = ["ENGINE_KINDS", "PoolError", "PoolLauncher", "RankPool"]
