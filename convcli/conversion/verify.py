"""Prove a written folder holds the checkpoint: same logits as the original tensors.

The reference logits come from a GPT2LMHeadModel built directly from the original
tensors in float32, computed before the folder is written. The folder is then loaded
with plain `AutoModelForCausalLM.from_pretrained` (upcast to float32, so only the
rounding of the saved weights shows, not CPU half-precision arithmetic).
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
    """A real encoded conversation (no token types, as DialoGPT ran) and a random sequence.

    Short on purpose: at 345M every token costs about a GFLOP per forward on the CPU.
    """
    import torch

    length = min(24, n_positions)
    conversation = tokenizer(SAMPLE_TURNS)["input_ids"][:length]
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(0, vocab_size, (max(1, length * 2 // 3),), generator=generator)
    return [torch.tensor(conversation), random]


def logits_of(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import torch

    with torch.inference_mode():
        return [_forward(model, ids) for ids in inputs]


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits of one unpadded sequence (no token types: DialoGPT ran without)."""
    import torch

    batch = ids[None]
    return model(batch, attention_mask=torch.ones_like(batch)).logits[0].float()


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
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True, trust_remote_code=False
    )
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise ConvcliError(f"verification failed: transformers reported {problems}")
    if step:
        step()
    model.eval()
    worst = 0.0
    scale = 1.0
    with torch.inference_mode():
        for ids, ref in zip(inputs, reference, strict=True):
            got = _forward(model, ids)
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
