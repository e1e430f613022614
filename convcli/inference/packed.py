"""Batched decoding on CPU through oneDNN's packed weights.

The profile of an MMI turn (benchmarks/mmi_turn.py) spends most of its time in the
products of 8 rows (one per candidate) with GPT-2's weight matrices. MKL's sgemm, which
`torch.addmm` uses on CPU, reads a weight matrix at nearly the same cost for 1 row as
for 8 but then computes the 8-row product at a fraction of the machine's speed; oneDNN
with the weight reordered once into its blocked layout computes it about twice as fast.
A one-row product (batch-1 decoding) is bound by reading the weights and MKL is as fast
there, so batch-1 calls keep the model's own weights and give bit-identical results to
plain transformers.

`pack_batched_linears(model)` reroutes GPT-2's `Conv1D` layers and its output layer:
an input with more than one row in its first dimension goes through a packed copy of
the weight, made the first time it is needed (so a model that only ever answers one
context costs no extra memory); anything else (one row, autograd, another device or
dtype) runs the layer's own forward. Parameters and `state_dict` are untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def packing_available() -> bool:
    """oneDNN's linear ops exist in this torch build (they are internal ops: checked)."""
    import torch

    mkldnn = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and mkldnn is not None
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def pack_batched_linears(model: nn.Module) -> int:
    """Route the batched calls of `model`'s linear layers through packed weights.

    Returns how many layers were rerouted (0 when the model is not float32 on CPU or
    oneDNN is missing). Calling it again changes nothing.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.float32:
        return 0
    if not packing_available():
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "_convcli_packing"):
            count += 1
        elif isinstance(module, Conv1D):
            _reroute(module, transposed=True)
            count += 1
        elif isinstance(module, torch.nn.Linear):
            _reroute(module, transposed=False)
            count += 1
    return count


def _reroute(module: nn.Module, *, transposed: bool) -> None:
    """Give `module` a forward that sends multi-row inputs through a packed weight.

    `transposed`: the weight is stored [in, out] (GPT-2's Conv1D) rather than [out, in].
    """
    import torch

    own_forward = module.forward
    state: dict[str, Any] = {"packed": None, "version": None}

    def packed_weight() -> torch.Tensor:
        weight = module.weight
        # Rebuild when the parameter was replaced or changed in place (loading, training).
        key = (weight.data_ptr(), weight._version)
        if state["version"] != key:
            dense = weight.detach()
            dense = dense.t().contiguous() if transposed else dense.contiguous()
            state["packed"] = torch.ops.mkldnn._reorder_linear_weight(dense)
            state["version"] = key
        return state["packed"]

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if (
            x.dim() < 2
            or x.shape[0] < 2
            or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and weight.requires_grad)
        ):
            return own_forward(x)
        bias = module.bias.detach() if module.bias is not None else None
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, packed_weight(), bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    module.forward = forward  # type: ignore[method-assign]
    module._convcli_packing = state  # type: ignore[assignment]
