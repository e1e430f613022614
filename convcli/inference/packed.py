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

import weakref
from typing import TYPE_CHECKING

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
    oneDNN is missing). Calling it again changes nothing. The layers change class (to
    a subclass of their own), so copies of the model (`copy.deepcopy`) stay correct.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.float32:
        return 0
    if not packing_available():
        return 0
    packed_class = _packed_classes()
    count = 0
    for module in model.modules():
        if type(module) in packed_class.values():
            count += 1
        elif type(module) in (Conv1D, torch.nn.Linear):
            module.__class__ = packed_class[type(module)]
            count += 1
    return count


def _packed_classes() -> dict[type, type]:
    """{Conv1D: its packed subclass, nn.Linear: its packed subclass}, made once."""
    global _CLASSES
    if _CLASSES is None:
        import torch
        from transformers.pytorch_utils import Conv1D

        class PackedConv1D(Conv1D):
            """GPT-2's Conv1D ([in, out] weight); batched inputs use a packed weight."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = _batched(self, x, transposed=True)
                return super().forward(x) if out is None else out

        class PackedLinear(torch.nn.Linear):
            """nn.Linear ([out, in] weight); batched inputs use a packed weight."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = _batched(self, x, transposed=False)
                return super().forward(x) if out is None else out

        _CLASSES = {Conv1D: PackedConv1D, torch.nn.Linear: PackedLinear}
    return _CLASSES


_CLASSES: dict[type, type] | None = None
# Packed weights by layer, outside the modules: oneDNN's opaque tensors cannot be
# deep-copied or pickled, and a copy of a model must pack its own weights anyway.
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def has_packed_weight(module: nn.Module) -> bool:
    """Whether a batched call has made this layer's packed weight."""
    return module in _PACKED


def _batched(module: nn.Module, x: torch.Tensor, *, transposed: bool) -> torch.Tensor | None:
    """`module(x)` through the packed weight, or None when the layer's own forward should
    run (one row, autograd, another device or dtype)."""
    import torch

    weight = module.weight
    if (
        x.dim() < 2
        or x.shape[0] < 2
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and weight.requires_grad)
    ):
        return None
    # Rebuild when the parameter was replaced or changed in place (loading, training);
    # inference tensors (made under inference_mode) keep no version counter.
    key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key:
        dense = weight.detach()
        dense = dense.t().contiguous() if transposed else dense.contiguous()
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(dense))
        _PACKED[module] = cached
    bias = module.bias.detach() if module.bias is not None else None
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, cached[1], bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])
