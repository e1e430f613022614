"""Model folders from a running Trainer: `final/` and `best/`, under any strategy.

Under FSDP every rank holds a shard of each weight, so `module.model` is no model to
save. The weights are gathered with Lightning's own `strategy.lightning_module_state_dict()`:
a collective that every rank must call (FSDP returns the full dict on rank 0 and an empty
one elsewhere; DDP and one device return the module's own tensors, nothing copied). Rank 0
then puts them in a plain model of the same architecture and writes the folder.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convcli.errors import ConvcliError
from convcli.modelfolder import ModelMeta, save_model_folder
from convcli.tokenizer import ConversationTokenizer

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from convcli.training.module import ConversationLM

MODEL_PREFIX = "model."  # ConversationLM keeps the Hugging Face model as `self.model`


def gathered_weights(trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
    """The full Hugging Face state dict on rank 0, None on the other ranks.

    A collective: call it on every rank at the same point, or FSDP waits forever.
    """
    state = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return None
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise ConvcliError(
            f"export: the {type(trainer.strategy).__name__} state dict has no model weights "
            f"(keys: {', '.join(list(state)[:3]) or 'none'})"
        )
    return weights


def standalone_model(template: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Any:
    """A model of `template`'s class and config whose parameters are `weights` (no copy).

    `template` may be sharded or wrapped: only its class, config and generation config
    are read. Built on the meta device, so no random initialisation runs.
    """
    config = copy.deepcopy(template.config)  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = type(template)(config)
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConvcliError(f"export: unexpected weights {result.unexpected_keys[:3]}")
    model.tie_weights()  # e.g. GPT-2's lm_head is wte
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ConvcliError(f"export: no gathered weights for {empty[:3]}")
    generation = getattr(template, "generation_config", None)
    if generation is not None:
        model.generation_config = copy.deepcopy(generation)
    return model.eval()


class FolderExport:
    """Writes a run's model folders (`RUN_DIR/<name>/`); call it on every rank."""

    def __init__(
        self,
        output: Path,
        tokenizer: ConversationTokenizer,
        meta: ModelMeta,
        *,
        train_on: str,
        extra_files: dict[str, str],
    ) -> None:
        self.output, self.tokenizer, self.meta = output, tokenizer, meta
        self.train_on, self.extra_files = train_on, extra_files

    def __call__(self, name: str, module: ConversationLM, trainer: pl.Trainer) -> Path | None:
        """Gather the weights (all ranks) and write `output/name` (rank 0); its path there."""
        weights = gathered_weights(trainer)
        if weights is None:
            return None
        meta = replace(
            self.meta,
            extra={"step": trainer.global_step, "train_on": self.train_on,
                   "val_loss": module.val_loss},
        )  # fmt: skip
        model = standalone_model(module.model, weights)
        return save_model_folder(
            model, self.tokenizer, meta, self.output / name,
            overwrite=True, extra_files=self.extra_files,
        )  # fmt: skip


def tokenizer_files(tokenizer: ConversationTokenizer) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, by name (kept inside checkpoints)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="convcli-tokenizer-") as tmp:
        tokenizer.save_pretrained(Path(tmp))
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
