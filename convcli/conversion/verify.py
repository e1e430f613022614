"""Prove a written folder holds the checkpoint: same logits as the original tensors.

The reference logits come from a GPT2LMHeadModel built directly around the original
tensors (or their exact float32 widening), computed before the folder is written. The
folder is then loaded with plain `AutoModelForCausalLM.from_pretrained` and run on the
same tokens. Both run in float32, so only the rounding of the saved weights shows, not
CPU half-precision arithmetic; half-precision weights are widened one block at a time
(`float32_forward`), so verifying never holds a float32 copy of a whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from convcli.errors import ConvcliError

if TYPE_CHECKING:
    import torch

    from convcli.tokenizer import ConversationTokenizer

# Allowed max |difference| relative to the largest reference logit (at least 1): what
# rounding the weights to each dtype can explain; a wrong weight moves logits by ~100%.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
SAMPLE_TURNS = ["Does money buy happiness?", "Depends how much money you spend on it."]


def sample_inputs(
    tokenizer: ConversationTokenizer, vocab_size: int, n_positions: int
) -> list[torch.Tensor]:
    """One sequence: a real encoded conversation (no token types, as DialoGPT ran), then
    random ids (rows of the embedding a conversation rarely reaches).

    Short on purpose: at 345M a forward costs ~0.15 s plus ~20 ms a token on one CPU
    core, and a wrong weight shows at every position (the logits cover every row of the
    output layer whatever the input).
    """
    import torch

    conversation = tokenizer(SAMPLE_TURNS)["input_ids"][:12]
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(0, vocab_size, (4,), generator=generator)
    return [torch.cat([torch.tensor(conversation), random])[:n_positions]]


def logits_of(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import torch

    with torch.inference_mode():
        return [float32_forward(model, ids) for ids in inputs]


def float32_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits of one unpadded sequence (no token types: DialoGPT ran without).

    Weights stay in their dtype: each piece of the model (embeddings, a block, the head)
    runs on float32 copies made as it starts. The copies go into buffers reused by the
    next piece of the same layout (every block shares one set): fresh memory costs more
    than copying here, and a whole float32 copy would double a half-precision model.
    """
    import torch

    saved: dict[torch.nn.Module, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
    buffers: dict[tuple[str, torch.Size], torch.Tensor] = {}

    def widen(module, _args) -> None:
        saved[module] = []
        for name, p in module.named_parameters():
            if p.dtype == torch.float32:
                continue
            key = (name, p.shape)
            if key not in buffers:
                buffers[key] = torch.empty(p.shape, dtype=torch.float32)
            saved[module].append((p, p.data))
            p.data = buffers[key].copy_(p.data)

    def restore(module, _args, _output) -> None:
        for p, data in saved.pop(module):
            p.data = data

    t = model.transformer
    hooks = []
    for module in (t.wte, t.wpe, *t.h, t.ln_f, model.lm_head):
        hooks += [module.register_forward_pre_hook(widen), module.register_forward_hook(restore)]
    try:
        batch = ids[None]
        return model(batch, attention_mask=torch.ones_like(batch)).logits[0].float()
    finally:
        for hook in hooks:
            hook.remove()
        for pairs in saved.values():  # an error mid-forward: put the weights back
            for p, data in pairs:
                p.data = data


def verify_folder(
    folder: Path,
    inputs: list[torch.Tensor],
    reference: list[torch.Tensor],
    dtype: str,
    *,
    step: Callable[[], None] | None = None,
) -> float:
    """Load `folder` with plain transformers and return the max logit difference.

    Raises ConvcliError on a mismatch beyond the dtype's tolerance, or when
    transformers reports missing, unexpected or mismatched keys.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM

    saved = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("dtype")
    if saved != dtype:
        raise ConvcliError(f"verification failed: the folder's config says {saved}, not {dtype}")
    # In its own dtype: the weights stay views of the (memory-mapped) file, no copy.
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), output_loading_info=True, trust_remote_code=False
    )
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise ConvcliError(f"verification failed: transformers reported {problems}")
    if model.dtype != getattr(torch, dtype):
        raise ConvcliError(f"verification failed: transformers loaded {model.dtype}, not {dtype}")
    if step:
        step()
    model.eval()
    worst = 0.0
    scale = 1.0
    with torch.inference_mode():
        for ids, ref in zip(inputs, reference, strict=True):
            got = float32_forward(model, ids)
            worst = max(worst, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            if step:
                step()
    del model
    if not worst <= TOLERANCE[dtype] * scale:  # also catches NaN
        raise ConvcliError(
            f"verification failed: the folder's logits differ from the checkpoint's by {worst:.3g} "
            f"(allowed for {dtype}: {TOLERANCE[dtype] * scale:.3g})"
        )
    return worst
