"""GPT-2 state dicts as DialoGPT and others saved them, made into Hugging Face's layout.

DialoGPT's files: keys `transformer.*`, a causal-mask buffer `h.{i}.attn.bias`
([1,1,1024,1024]) per layer, `lm_head.decoder.weight` (a copy of `wte`), fp16.
Variants: a `module.` prefix (multi-GPU saves), no `transformer.` prefix (raw GPT-2),
`lm_head.weight`, no lm_head (tied), `attn.masked_bias`, fp32. Conv1D weights are
already in Hugging Face's [in, out] layout, so nothing is transposed.

File names lie (released "small" files holding other sizes), so the size comes from
the tensors: vocabulary and width from `wte`, positions from `wpe`, layers from the
distinct `h.{i}`, inner width from `mlp.c_fc`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convcli.errors import ConvcliError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import GPT2Config

# Prefixes wrappers put in front of the model's own keys: DataParallel/DDP,
# torch.compile, and a LightningModule's `self.model`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# The causal-mask buffers of old GPT-2 code. Only these: `attn.c_attn.bias` also ends
# in "attn.bias" and is a real weight.
MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
LAYER = re.compile(r"^transformer\.h\.(\d+)\.")
LM_HEAD = "lm_head.weight"
WTE = "transformer.wte.weight"
WPE = "transformer.wpe.weight"
# GPT-2's heads are 64 wide at every released size (768->12, 1024->16, 1280->20, 1600->25).
HEAD_WIDTH = 64


@dataclass
class Gpt2Shape:
    """The size of a GPT-2, read from its tensors."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_inner: int

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face GPT-2 key (lm_head aside) with its shape."""
        e, inner = self.n_embd, self.n_inner
        shapes: dict[str, tuple[int, ...]] = {
            WTE: (self.vocab_size, e),
            WPE: (self.n_positions, e),
        }
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            shapes |= {
                p + "ln_1.weight": (e,),
                p + "ln_1.bias": (e,),
                p + "attn.c_attn.weight": (e, 3 * e),
                p + "attn.c_attn.bias": (3 * e,),
                p + "attn.c_proj.weight": (e, e),
                p + "attn.c_proj.bias": (e,),
                p + "ln_2.weight": (e,),
                p + "ln_2.bias": (e,),
                p + "mlp.c_fc.weight": (e, inner),
                p + "mlp.c_fc.bias": (inner,),
                p + "mlp.c_proj.weight": (inner, e),
                p + "mlp.c_proj.bias": (e,),
            }
        shapes |= {"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}
        return shapes


def normalize_keys(
    state: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Rename keys to Hugging Face's GPT-2 names; drop mask buffers and a tied lm_head copy.

    Returns the new dict (same tensor objects, nothing copied), the original names
    of the dropped keys, and each new name's original name (for messages).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    for key, tensor in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name == "lm_head.decoder.weight":
            name = LM_HEAD
        elif not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if MASK_BUFFER.match(name):
            dropped.append(key)
            continue
        if name in out:
            if out[name].shape != tensor.shape or not torch.equal(out[name], tensor):
                raise ConvcliError(
                    f"{where}: {origin[name]!r} and {key!r} are both {name} but differ"
                )
            dropped.append(key)
            continue
        out[name], origin[name] = tensor, key
    head = out.get(LM_HEAD)
    wte = out.get(WTE)
    if (
        head is not None
        and wte is not None
        and head.shape == wte.shape
        and (head.data_ptr() == wte.data_ptr() or same_bits(head, wte))
    ):
        # DialoGPT's lm_head.decoder is a copy of wte: the folder ties them instead.
        dropped.append(origin.pop(LM_HEAD))
        del out[LM_HEAD]
    return out, dropped, origin


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal: a copy. Compared as integers, ~4x faster than torch.equal on
    half-precision CPU tensors (0.04 s for DialoGPT-medium's embedding)."""
    import torch

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype != b.dtype or a.shape != b.shape or a.element_size() not in ints:
        return a.dtype == b.dtype and torch.equal(a, b)
    kind = ints[a.element_size()]
    return torch.equal(a.view(kind), b.view(kind))


def infer_shape(
    state: dict[str, torch.Tensor], where: str, origin: dict[str, str] | None = None
) -> Gpt2Shape:
    """Read the model's size from its tensors; complain about anything not GPT-2.

    `origin` maps names back to the file's own, for messages about unexpected keys.
    """
    layers = {int(m.group(1)) for k in state if (m := LAYER.match(k))}
    n_layer = max(layers) + 1 if layers else 0
    for required in (WTE, WPE, "transformer.h.0.mlp.c_fc.weight"):
        if required not in state or state[required].dim() != 2:
            _missing(state, where, n_layer)
    shape = Gpt2Shape(
        vocab_size=state[WTE].shape[0],
        n_positions=state[WPE].shape[0],
        n_embd=state[WTE].shape[1],
        n_layer=n_layer,
        n_inner=state["transformer.h.0.mlp.c_fc.weight"].shape[1],
    )
    expected = shape.expected()
    if set(expected) - set(state):
        _missing(state, where, n_layer)
    unexpected = sorted((origin or {}).get(k, k) for k in set(state) - set(expected) - {LM_HEAD})
    if unexpected:
        raise ConvcliError(
            f"{where}: keys that are not part of GPT-2: {_some(unexpected)} "
            f"(is this a GPT-2 language model checkpoint?)"
        )
    if LM_HEAD in state:
        expected[LM_HEAD] = (shape.vocab_size, shape.n_embd)
    for key, want in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != want:
            raise ConvcliError(
                f"{where}: inconsistent shapes: {key} is {list(tensor.shape)} but "
                f"{WTE} {list(state[WTE].shape)} and {WPE} {list(state[WPE].shape)} "
                f"make it {list(want)}"
            )
        if not tensor.is_floating_point():
            raise ConvcliError(f"{where}: {key} holds {tensor.dtype}, not floating-point weights")
    return shape


def _missing(state: dict[str, torch.Tensor], where: str, n_layer: int) -> None:
    guess = Gpt2Shape(vocab_size=0, n_positions=0, n_embd=0, n_layer=max(n_layer, 1), n_inner=0)
    missing = [k for k in guess.expected() if k not in state]
    if len(missing) == len(guess.expected()):
        raise ConvcliError(
            f"{where}: not a GPT-2 state dict: missing {_some(missing)}; "
            f"it holds {_some(sorted(state))}"
        )
    raise ConvcliError(f"{where}: incomplete GPT-2 state dict: missing {_some(missing)}")


def _some(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def check_sizes(
    shape: Gpt2Shape,
    *,
    n_head: int | None,
    n_layer: int | None = None,
    n_embd: int | None = None,
    head_source: str = "`n_head`",
) -> int:
    """Check user-given sizes against the tensors; return the number of heads."""
    if n_layer is not None and n_layer != shape.n_layer:
        raise UsageError(
            f"`n_layer` {n_layer} disagrees with the checkpoint, which has {shape.n_layer} layers"
        )
    if n_embd is not None and n_embd != shape.n_embd:
        raise UsageError(
            f"`n_embd` {n_embd} disagrees with the checkpoint, whose width is {shape.n_embd}"
        )
    if n_head is None:
        if shape.n_embd % HEAD_WIDTH:
            raise UsageError(
                f"cannot infer the number of heads of width {shape.n_embd} "
                f"(not a multiple of {HEAD_WIDTH}); pass `n_head`"
            )
        return shape.n_embd // HEAD_WIDTH
    if n_head < 1 or shape.n_embd % n_head:
        raise UsageError(
            f"{head_source} {n_head} disagrees with the checkpoint: it does not divide its width "
            f"{shape.n_embd}"
        )
    return n_head


def gpt2_config(shape: Gpt2Shape, n_head: int, *, tied: bool, eos_id: int) -> GPT2Config:
    """The configuration DialoGPT used (GPT-2's own settings) at this size."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=n_head,
        n_inner=None if shape.n_inner == 4 * shape.n_embd else shape.n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        scale_attn_weights=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=tied,
    )


def build_model(config: GPT2Config, state: dict[str, torch.Tensor]):
    """A GPT2LMHeadModel whose parameters *are* these tensors (no random init, no copy)."""
    import torch
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    expected_missing = [LM_HEAD] if config.tie_word_embeddings else []
    if sorted(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise ConvcliError(  # infer_shape checked the keys: this is a bug, say what happened
            f"GPT-2 did not take the converted keys: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConvcliError(f"GPT-2 parameters left without weights: {still_meta[:3]}")
    return model.eval()
