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
# tests/tests_fabric/strategies/test_single_device.py: test_clip_gradients (CPU parametrizations), imports swapped to nbfabric.

import pytest
import torch

from nbfabric import Fabric  # was: from lightning.fabric import Fabric


@pytest.mark.parametrize(
    "precision",
    [
        "32-true",
        # nbfabric: the CUDA parametrizations (16-mixed, bf16-mixed) are not selected
    ],
)
@pytest.mark.parametrize("clip_type", ["norm", "val"])
def test_clip_gradients(clip_type, precision):
    if clip_type == "norm" and precision == "16-mixed":
        pytest.skip(reason="Clipping by norm with 16-mixed is numerically unstable.")

    fabric = Fabric(accelerator="auto", devices=1, precision=precision)
    _run_test_clip_gradients(fabric=fabric, clip_type=clip_type)


def _run_test_clip_gradients(fabric, clip_type):
    in_features, out_features = 32, 2
    model = torch.nn.Linear(in_features, out_features, bias=False)
    model.weight.data.fill_(0.01)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)

    batch = torch.full((1, in_features), 0.1, device=fabric.device)
    loss = model(batch).sum()

    # The example is constructed such that the gradients are all the same
    fabric.backward(loss)

    if clip_type == "norm":
        norm = torch.linalg.vector_norm(model.weight.grad.detach().cpu(), 2, dtype=torch.float32).item()
        new_norm = norm / 2.0
        fabric.clip_gradients(model, optimizer, max_norm=new_norm)
        assert torch.allclose(
            torch.linalg.vector_norm(model.weight.grad.detach().cpu(), 2, dtype=torch.float32),
            torch.tensor(new_norm),
        )
    elif clip_type == "val":
        val = model.weight.grad.view(-1)[0].item()
        new_val = val / 2.0
        fabric.clip_gradients(model, optimizer, clip_val=new_val)
        assert torch.allclose(model.weight.grad, torch.full_like(model.weight.grad, new_val))
    else:
        raise AssertionError(f"Unknown clip type: {clip_type}")

    optimizer.step()
    optimizer.zero_grad()

