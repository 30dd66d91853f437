"""A Hugging Face model trained in a `%%fabric` cell generates text inside the cell, through the
wrapper and without `mark_forward_method`, since `generate` runs with gradients off."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the interop extra (transformers) is not installed")

from test_interop import kernel  # noqa: E402,F401 - a module's own kernel, as the interop tests start it


def test_a_tiny_gpt2_trained_in_a_cell_generates_inside_it_on_every_rank(kernel):
    shown = kernel.run(
        """
        %%fabric --devices=2 --accelerator=cpu
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0))
        model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(fabric.global_rank))
        for _ in range(3):
            optimizer.zero_grad()
            fabric.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()
        model.eval()  # no dropout: the same tokens here and, later, in the notebook
        prompt = torch.tensor([[5, 6, 7]])
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        same_on_both = fabric.all_gather(generated)
        bool(torch.equal(same_on_both[0], same_on_both[1])), generated.shape[1]
        """,
        timeout=240,
    )
    assert shown["error"] is None, shown["error"] and shown["error"]["evalue"]
    assert shown["result"] == "(True, 7)"
    direct = kernel.run("print(model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0).tolist() == generated.tolist())")
    assert direct["stdout"].strip() == "True"  # the trained model came back and generates the same here
