"""Code written for Hugging Face Accelerate and Lightning Fabric, unchanged inside `%%fabric`."""

from __future__ import annotations

import pytest


from test_magic import Kernel  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    kernel = Kernel(tmp_path_factory.mktemp("settings") / "none.json")
    yield kernel
    kernel.close()


def test_an_accelerate_loop_sees_both_ranks_and_trains_in_sync(kernel):
    pytest.importorskip("accelerate", reason="the interop extra is not installed")
    out = kernel.run(
        """
        %%fabric --accelerator=cpu --devices=2
        from accelerate import Accelerator
        from torch.utils.data import DataLoader, TensorDataset
        accelerator = Accelerator()  # unchanged: no cpu=True needed
        torch.manual_seed(accelerator.process_index)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=4)
        model, optimizer, data = accelerator.prepare(model, optimizer, data)
        for x, y in data:
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
        weights = accelerator.gather(accelerator.unwrap_model(model).weight.detach()[None])
        print(accelerator.num_processes, len(data), bool((weights[0] == weights[1]).all()))
        """
    )
    assert out["error"] is None, out["error"]
    assert "[rank 0] 2 4 True" in out["stdout"] and "[rank 1] 2 4 True" in out["stdout"]
    assert kernel.run("type(model).__name__")["result"] == "'Linear'"


def test_an_accelerator_the_notebook_made_first_does_not_hide_the_ranks_from_one_made_in_the_cell(kernel):
    pytest.importorskip("accelerate", reason="the interop extra is not installed")
    kernel.run("from accelerate import Accelerator\nnotebook_accelerator = Accelerator()")
    cell = """
        %%fabric --accelerator=cpu --devices=2 --no-return
        from accelerate import Accelerator
        accelerator = Accelerator()
        total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
        print(accelerator.process_index, accelerator.num_processes, accelerator.distributed_type, int(total))
        """
    for _ in range(2):  # and again, after the first cell's ranks
        out = kernel.run(cell)
        assert out["error"] is None, out["error"]
        assert "[rank 0] 0 2 DistributedType.MULTI_CPU 3" in out["stdout"] and "[rank 1] 1 2 DistributedType.MULTI_CPU 3" in out["stdout"], out["stdout"]
    assert kernel.run("notebook_accelerator.num_processes")["result"] == "1"  # the notebook's own is as it was


@pytest.mark.parametrize("precision, expected", [("bf16-mixed", "bf16 torch.bfloat16"), ("32-true", "no torch.float32")])
def test_an_accelerator_in_the_cell_takes_the_cell_s_precision_as_under_accelerate_launch(kernel, precision, expected):
    pytest.importorskip("accelerate", reason="the interop extra is not installed")
    out = kernel.run(
        f"""
        %%fabric --accelerator=cpu --devices=2 --precision={precision} --no-return
        from accelerate import Accelerator
        accelerator = Accelerator()
        with accelerator.autocast():
            print(accelerator.mixed_precision, torch.nn.Linear(2, 1)(torch.ones(1, 2)).dtype)
        """
    )
    assert out["error"] is None, out["error"]
    assert f"[rank 0] {expected}" in out["stdout"] and f"[rank 1] {expected}" in out["stdout"], out["stdout"]


def test_a_lightning_fabric_made_in_the_cell_joins_the_same_process_group(kernel):
    pytest.importorskip("lightning", reason="the interop extra is not installed")
    out = kernel.run(
        """
        %%fabric --accelerator=cpu --devices=2
        import lightning as L
        import torch.distributed as dist
        group = dist.group.WORLD
        lightning_fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
        lightning_fabric.launch()
        net, sgd = lightning_fabric.setup(torch.nn.Linear(4, 1), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
        total = lightning_fabric.all_reduce(torch.tensor(lightning_fabric.global_rank + 1.0), reduce_op="sum")
        print(lightning_fabric.world_size, total.item(), dist.group.WORLD is group)
        """,
        timeout=60,
    )
    assert out["error"] is None, out["error"]
    assert "[rank 0] 2 3.0 True" in out["stdout"] and "[rank 1] 2 3.0 True" in out["stdout"]
    assert kernel.run("(type(net).__name__, type(sgd).__name__)")["result"] == "('Linear', 'SGD')"
