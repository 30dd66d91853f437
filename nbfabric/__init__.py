"""Train PyTorch models on several GPUs or CPU processes from a Jupyter notebook."""

from nbfabric.config import RunConfig
from nbfabric.fabric import Fabric
from nbfabric.launcher import ForkUnsafeError, RankError, RankTimeoutError, launch

__all__ = ["Fabric", "RunConfig", "launch", "RankError", "RankTimeoutError", "ForkUnsafeError"]
__version__ = "0.1.0"
