"""oneDNN-packed weights for batched rows: same results as the layers they replace."""

from __future__ import annotations

import copy

import pytest
import torch

from convcli.inference.packed import pack_batched_linears, packing_available
from tests.conftest import tiny_gpt2

pytestmark = pytest.mark.skipif(not packing_available(), reason="no oneDNN in this torch")


def test_batched_logits_match_and_copies_use_their_own_weights():
    model = tiny_gpt2(300, seed=3)
    reference = copy.deepcopy(model)
    assert pack_batched_linears(model) == 2 * 4 + 1  # 4 Conv1D per block, the output layer
    assert pack_batched_linears(model) == 9  # again: nothing changes
    ids = torch.randint(0, 300, (3, 7))
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    # A copy whose weights then change computes with its own weights, not the original's.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.mul_(2)
        reference.transformer.h[0].mlp.c_fc.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(other(ids).logits, reference(ids).logits, atol=1e-5)
        assert not torch.allclose(other(ids).logits, model(ids).logits, atol=1e-3)
    # The state dict is the model's own (nothing packed is saved).
    assert set(model.state_dict()) == set(reference.state_dict())


def test_training_and_other_dtypes_keep_the_layers_own_forward():
    model = tiny_gpt2(300)
    pack_batched_linears(model)
    ids = torch.randint(0, 300, (2, 5))
    model(ids, labels=ids).loss.backward()  # autograd: the own forward (packed has no grad)
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert pack_batched_linears(tiny_gpt2(300).to(torch.bfloat16)) == 0
