"""Train PyTorch models on several GPUs or CPU processes from a Jupyter notebook."""

from nbfabric.config import RunConfig
from nbfabric.fabric import Fabric
from nbfabric.strategies import FSDP
from nbfabric.launcher import ForkUnsafeError, RankError, RankTimeoutError, launch


def load_ipython_extension(ipython) -> None:
    """`%load_ext nbfabric` registers `%%fabric` and `%fabric`."""
    from nbfabric.notebook import load_ipython_extension as load

    load(ipython)


__all__ = ["Fabric", "FSDP", "RunConfig", "launch", "RankError", "RankTimeoutError", "ForkUnsafeError", "load_ipython_extension"]
__version__ = "0.1.0"
