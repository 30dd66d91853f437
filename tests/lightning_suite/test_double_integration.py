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
# tests/tests_fabric/plugins/precision/test_double_integration.py, imports swapped to nbfabric.

import pytest
import torch
import torch.nn as nn

from nbfabric import Fabric  # was: from lightning.fabric import Fabric


class BoringDoubleModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)
        self.register_buffer("complex_buffer", torch.complex(torch.rand(10), torch.rand(10)), False)

    def forward(self, x):
        assert x.dtype == torch.float64
        # the default dtype for new tensors is now float64
        assert torch.tensor([0.0]).dtype == torch.float64
        return self.layer(x)


# nbfabric: RunIf(mps=False) dropped: only the CPU runs it here
def test_double_precision():
    fabric = Fabric(devices=1, precision="64-true")

    with fabric.init_module():
        model = BoringDoubleModule()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)

    batch = torch.rand(2, 32, device=fabric.device)
    assert model.layer.weight.dtype == model.layer.bias.dtype == torch.float64
    assert model.complex_buffer.dtype == torch.complex128

    assert batch.dtype == torch.float32
    output = model(batch)
    assert output.dtype == torch.float32
    loss = torch.nn.functional.mse_loss(output, torch.ones_like(output))
    fabric.backward(loss)
    assert model.layer.weight.grad.dtype == torch.float64
    optimizer.step()
    optimizer.zero_grad()

