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
# tests/tests_fabric/utilities/test_spike.py: Lightning's SpikeDetection callback driven by an nbfabric Fabric
# (only the Fabric import is swapped; the callback is Lightning's, so Lightning must be installed).

import contextlib

import pytest
import torch
from lightning_utilities.core.imports import RequirementCache

from nbfabric import Fabric  # was: from lightning.fabric import Fabric
from lightning_suite.helpers import RunIf  # was: from tests_fabric.helpers.runif import RunIf

pytest.importorskip("lightning.fabric", reason="the callback under test is Lightning's")
from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException  # noqa: E402

# nbfabric: Lightning's private `lightning.fabric.utilities.imports._TORCHMETRICS_GREATER_EQUAL_1_0_0`, spelled out
_TORCHMETRICS_GREATER_EQUAL_1_0_0 = RequirementCache("torchmetrics>=1.0.0")


def spike_detection_test(fabric, global_rank_spike, spike_value, should_raise):
    loss_vals = [1 / i for i in range(1, 10)]
    if fabric.global_rank == global_rank_spike:
        if spike_value is None:
            loss_vals[4] = 3
        else:
            loss_vals[4] = spike_value

    for i in range(len(loss_vals)):
        context = pytest.raises(TrainingSpikeException) if i == 4 and should_raise else contextlib.nullcontext()

        with context:
            fabric.call(
                "on_train_batch_end",
                fabric=fabric,
                loss=torch.tensor(loss_vals[i], device=fabric.device),
                batch=None,
                batch_idx=i,
            )


# nbfabric: @pytest.mark.flaky(reruns=3) dropped (pytest-rerunfailures is not a dependency here)
@pytest.mark.parametrize(
    ("global_rank_spike", "num_devices", "spike_value", "finite_only"),
    # NOTE FOR ALL FOLLOWING TESTS:
    # adding run on linux only because multiprocessing on other platforms takes forever
    [
        pytest.param(0, 1, None, True),
        pytest.param(0, 1, None, False),
        pytest.param(0, 1, float("inf"), True),
        pytest.param(0, 1, float("inf"), False),
        pytest.param(0, 1, float("-inf"), True),
        pytest.param(0, 1, float("-inf"), False),
        pytest.param(0, 1, float("NaN"), True),
        pytest.param(0, 1, float("NaN"), False),
        # nbfabric: three of Lightning's sixteen 2-rank parametrizations (a spike on rank 0, on rank 1, and a NaN
        # that must not raise), to keep the run short on 2 CPU cores: each starts 2 spawned ranks
        pytest.param(0, 2, None, True, marks=RunIf(linux_only=True)),
        pytest.param(1, 2, None, True, marks=RunIf(linux_only=True)),
        pytest.param(1, 2, float("NaN"), False, marks=RunIf(linux_only=True)),
    ],
)
@pytest.mark.skipif(not _TORCHMETRICS_GREATER_EQUAL_1_0_0, reason="requires torchmetrics>=1.0.0")
def test_fabric_spike_detection_integration(tmp_path, global_rank_spike, num_devices, spike_value, finite_only):
    fabric = Fabric(
        accelerator="cpu",
        devices=num_devices,
        callbacks=[SpikeDetection(exclude_batches_path=tmp_path, finite_only=finite_only)],
        strategy="ddp_spawn",
    )

    # spike_value == None -> typical spike detection
    # finite_only -> typical spike detection and raise with NaN +/- inf
    # if inf -> inf >> other values -> typical spike detection
    should_raise = spike_value is None or finite_only or spike_value == float("inf")
    fabric.launch(
        spike_detection_test,
        global_rank_spike=global_rank_spike,
        spike_value=spike_value,
        should_raise=should_raise,
    )

