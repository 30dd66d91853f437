"""Train PyTorch models on several GPUs or CPU processes from a Jupyter notebook."""

from nbfabric.launcher import ForkUnsafeError, RankError, RankTimeoutError, launch

__all__ = ["launch", "RankError", "RankTimeoutError", "ForkUnsafeError"]
