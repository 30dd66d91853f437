"""Fixtures for Lightning's tests run against nbfabric (see __init__.py): the parts of Lightning's
``tests/tests_fabric/conftest.py`` (tag 2.6.5) that the selected tests rely on, written for nbfabric.

* ``restore_env_variables``: the environment is restored after each test, and a test that leaves a
  variable behind fails, with Lightning's allowlist of known leakers (as upstream).
* ``preserve_global_rank_variable``: ``rank_zero_only.rank`` (lightning_utilities' object, which
  nbfabric exports and sets when a Fabric joins its rank) is put back after each test.
* ``teardown_process_group``: a default process group left in this process is destroyed.
* ``xla_available``: upstream mocks Lightning's XLA flags; nbfabric offers no XLA, and only the
  non-XLA parametrizations of tests that request it are selected, so here it does nothing.
"""

from __future__ import annotations

import os

import pytest
import torch.distributed


@pytest.fixture(autouse=True)
def preserve_global_rank_variable():
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    yield
    if rank is not None:
        rank_zero_only.rank = rank


@pytest.fixture(autouse=True)
def restore_env_variables():
    env_backup = os.environ.copy()
    yield
    leaked_vars = os.environ.keys() - env_backup.keys()
    os.environ.clear()
    os.environ.update(env_backup)
    allowlist = {  # Lightning's list (tests_fabric/conftest.py)
        "CUDA_DEVICE_ORDER",
        "LOCAL_RANK",
        "NODE_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PL_GLOBAL_SEED",
        "PL_SEED_WORKERS",
        "RANK",
        "CUDA_MODULE_LOADING",
        "CRC32C_SW_MODE",
        "OMP_NUM_THREADS",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
    }
    leaked_vars.difference_update(allowlist)
    assert not leaked_vars, f"test is leaking environment variable(s): {set(leaked_vars)}"


@pytest.fixture(autouse=True)
def teardown_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def xla_available() -> None:
    """Nothing to mock: nbfabric has no XLA support, and no selected parametrization uses XLA."""
