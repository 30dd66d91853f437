"""Rank pools: ranks that outlive a run (ipyparallel engines, started here or by its Slurm, MPI or
SSH launchers), their launcher, and the engines' side of a run."""

from nbfabric.pool.cluster import ENGINE_KINDS, EngineCluster, PoolError
from nbfabric.pool.launcher import PoolLauncher
from nbfabric.pool.rank_pool import RankPool

__all__ = ["ENGINE_KINDS", "EngineCluster", "PoolError", "PoolLauncher", "RankPool"]
