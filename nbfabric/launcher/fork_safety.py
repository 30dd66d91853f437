"""Whether ranks can be forked from this process: not once CUDA or a process group is initialised here."""

from __future__ import annotations

import sys

from nbfabric.launcher import cuda_culprit
from nbfabric.devices import cuda_initialized
from nbfabric.launcher.errors import ForkUnsafeError

# From the first import of nbfabric on (the extension and the nbfabric kernel import it at load), so
# that a refusal can name what initialised CUDA.
cuda_culprit.install()


def check_fork_safe() -> None:
    """Refuse to fork once CUDA is initialised in this process (a forked child cannot use it)."""
    torch = sys.modules.get("torch")
    if torch is not None and cuda_initialized():
        where = cuda_culprit.culprit()
        raise ForkUnsafeError(
            "CUDA is already initialised in this process, so ranks cannot be forked from it. "
            + (f"{where} " if where else "")
            + "Without a restart: start a rank pool with %fabric start --engines=local (or "
            "nbfabric.RankPool(...)) and run the cell again, or launch with start_method='spawn' "
            "(--start-method=spawn). Or restart the kernel and keep CUDA work inside the launched "
            "function or %%fabric cell."
        )
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ForkUnsafeError(
            "a torch.distributed process group is active in this process, and forked ranks would inherit "
            "it half-working. Call torch.distributed.destroy_process_group() first, or launch with "
            "start_method='spawn'."
        )
