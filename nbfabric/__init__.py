"""Train PyTorch models on several GPUs or CPU processes from a Jupyter notebook."""

from lightning_utilities.core.rank_zero import rank_zero_only

from nbfabric.config import RunConfig
from nbfabric.fabric import Fabric
from nbfabric.strategies import FSDP
from nbfabric.launcher import ForkUnsafeError, RankError, RankTimeoutError, UnreachedCollectiveError, launch
from nbfabric.pool import PoolError, RankPool
from nbfabric.seeding import seed_everything
from nbfabric.wrappers import is_wrapped


def load_ipython_extension(ipython) -> None:
    """`%load_ext nbfabric` registers `%%fabric` and `%fabric`."""
    from nbfabric.notebook import load_ipython_extension as load

    load(ipython)


def picker(config=None):
    """Show the hardware picker; its choices become the defaults of later `%%fabric` cells, and its
    Save button writes them to `config` (default: `$NBFABRIC_CONFIG`, else the user's config directory)."""
    from nbfabric.notebook.picker import picker as show

    return show(config)


__all__ = ["Fabric", "FSDP", "RunConfig", "launch", "seed_everything", "is_wrapped", "rank_zero_only", "RankPool", "RankError", "RankTimeoutError", "UnreachedCollectiveError", "ForkUnsafeError", "PoolError", "load_ipython_extension", "picker"]
__version__ = "0.1.0"
