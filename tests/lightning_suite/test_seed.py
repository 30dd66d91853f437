# Copyright The Lightning AI team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Vendored from Lightning-AI/pytorch-lightning, tag 2.6.5 (commit be98784a1a03581b7051a355ae1084fd352d7cea),
# tests/tests_fabric/utilities/test_seed.py: the selected tests (see lightning_suite/__init__.py), imports swapped to nbfabric.

import os
import random
import warnings
from unittest import mock

import numpy
import pytest
import torch

from nbfabric import seed_everything  # was: from lightning.fabric.utilities.seed import seed_everything
from nbfabric.seeding import worker_init as pl_worker_init_function  # was: lightning.fabric.utilities.seed


@mock.patch.dict(os.environ, clear=True)
def test_default_seed():
    """Test that the default seed is 0 when no seed provided and no environment variable set."""
    assert seed_everything() == 0
    assert os.environ["PL_GLOBAL_SEED"] == "0"


@mock.patch.dict(os.environ, {}, clear=True)
def test_seed_stays_same_with_multiple_seed_everything_calls():
    """Ensure that after the initial seed everything, the seed stays the same for the same run."""
    with pytest.warns(UserWarning, match="No seed found"):
        seed_everything()
    initial_seed = os.environ.get("PL_GLOBAL_SEED")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seed_everything()
    seed = os.environ.get("PL_GLOBAL_SEED")

    assert initial_seed == seed


@mock.patch.dict(os.environ, {"PL_GLOBAL_SEED": "2020"}, clear=True)
def test_correct_seed_with_environment_variable():
    """Ensure that the PL_GLOBAL_SEED environment is read."""
    assert seed_everything() == 2020


@mock.patch.dict(os.environ, {"PL_GLOBAL_SEED": "invalid"}, clear=True)
def test_invalid_seed():
    """Ensure that a ValueError is raised if an invalid seed is given."""
    with pytest.raises(ValueError, match="Invalid seed specified"):
        seed_everything()


@mock.patch.dict(os.environ, {}, clear=True)
@pytest.mark.parametrize("seed", [10e9, -10e9])
def test_out_of_bounds_seed(seed):
    """Ensure that a ValueError is raised if an out-of-bounds seed is given."""
    with pytest.raises(ValueError, match="is not in bounds"):
        seed_everything(seed)


def test_seed_everything_accepts_valid_seed_argument():
    """Ensure that seed_everything returns the provided valid seed."""
    seed_value = 45
    assert seed_everything(seed_value) == seed_value


@mock.patch.dict(os.environ, {"PL_GLOBAL_SEED": "17"}, clear=True)
def test_seed_everything_accepts_valid_seed_from_env():
    """Ensure that seed_everything uses the valid seed from the PL_GLOBAL_SEED environment variable."""
    assert seed_everything() == 17


@mock.patch.dict(os.environ, {}, clear=True)
def test_seed_everything_non_verbose_no_warning():
    """Ensure that no warning is emitted when verbose is False and no seed is provided."""
    with warnings.catch_warnings(record=True) as caught:
        seed_everything(verbose=False)
    assert caught == []


@pytest.mark.parametrize(("num_workers", "num_ranks"), [(64, 64)])
@pytest.mark.parametrize("base_seed", [100, 1024, 2**32 - 1])
def test_pl_worker_init_function(base_seed, num_workers, num_ranks):
    """Test that Lightning's `worker_init_fn` sets unique seeds per worker/rank derived from the base seed."""
    torch_rands = set()
    stdlib_rands = set()
    numpy_rands = set()

    for worker_id in range(num_workers):
        for rank in range(num_ranks):
            seed_everything(base_seed)
            pl_worker_init_function(worker_id, rank)
            torch_rands.add(tuple(torch.randint(0, 1_000_000, (100,)).tolist()))
            stdlib_rands.add(tuple(random.randint(0, 1_000_000) for _ in range(100)))
            numpy_rands.add(tuple(numpy.random.randint(0, 1_000_000, (100,)).tolist()))

    # Assert there are no duplicates (no collisions)
    assert len(torch_rands) == num_ranks * num_workers
    assert len(stdlib_rands) == num_ranks * num_workers
    assert len(numpy_rands) == num_ranks * num_workers
    assert len(torch_rands | stdlib_rands | numpy_rands) == 3 * num_workers * num_ranks

