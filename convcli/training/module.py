"""The LightningModule: a Hugging Face causal LM, per-token loss, AdamW with warmup.

The model is `self.model`, so checkpoint `state_dict` keys are `model.<hf key>`, and
`hyper_parameters` hold what rebuilds it without the run: the TrainSettings as a dict,
the Hugging Face config dict and the ModelMeta fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from convcli.errors import ConvcliError
from convcli.training.datamodule import IGNORE
from convcli.training.schedule import Schedule, choose_schedule, lr_factor


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the labelled tokens, and their count.

    Labels are aligned with the inputs, so position p predicts label p + 1.
    """
    targets = labels[:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, (targets != IGNORE).sum()


def plain_name(name: str) -> str:
    """A parameter name without the wrapper modules FSDP and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class ConversationLM(pl.LightningModule):
    """Fine-tunes (or trains from scratch) a Hugging Face causal LM on conversations."""

    def __init__(
        self,
        settings: dict[str, Any],
        config: dict[str, Any],
        meta: dict[str, Any],
        model: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if model is None:  # rebuilt from hyper_parameters (e.g. load_from_checkpoint)
            from transformers import AutoConfig, AutoModelForCausalLM

            from convcli.loadgate import check_model_type

            check_model_type(config, "the checkpoint's model config")  # nothing foreign built
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        self.model = model
        # Decided now, on the real shapes: under FSDP the parameters later are flat shards.
        self.no_decay = {plain_name(n) for n, p in model.named_parameters() if p.ndim < 2}
        self.settings = settings
        self.token_types = bool(meta["token_types"])
        # Not in state_dict (its keys are the HF model's); saved in the checkpoint by hand.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.tokens_before = 0  # all ranks, from the checkpoint we resumed
        self.register_buffer("val_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("val_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.val_loss: float | None = None
        # Saved in every checkpoint so a .ckpt converts without the run (`convcli convert`).
        self.tokenizer_files: dict[str, bytes] = {}
        self.data_identity: dict[str, Any] = {}
        # Set by configure_optimizers, once the run's length is known; `report` hears it.
        self.schedule: Schedule | None = None
        self.report: Callable[[str], None] | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids") if self.token_types else None,
        )
        return out.logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, count = token_loss(self(batch), batch["labels"])
        loss = total / count.clamp(min=1)
        if not torch.isfinite(loss):
            raise ConvcliError(
                f"the loss is {loss.item()} at step {self.global_step + 1}: training stopped "
                "(try a lower `learning_rate`, `precision` 32, or check the start model)",
                param=("learning_rate", "precision"),
            )
        self.tokens_seen += batch["attention_mask"].sum()
        self.log("train_loss", loss, prog_bar=True, batch_size=int(count))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self.log("lr", scheduler.get_last_lr()[0])

    def on_validation_epoch_start(self) -> None:
        self.val_sum.zero_()
        self.val_count.zero_()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, count = token_loss(self(batch), batch["labels"])
        self.val_sum += total.double()
        self.val_count += count

    def on_validation_epoch_end(self) -> None:
        # Sum of token losses over token count across the split and all ranks.
        total = self.trainer.strategy.reduce(self.val_sum.clone(), reduce_op="sum")
        count = self.trainer.strategy.reduce(self.val_count.clone(), reduce_op="sum")
        if int(count) == 0:
            return
        loss = float(total) / int(count)
        self.val_loss = loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=False)
        self.log("val_ppl", math.exp(min(loss, 50.0)), sync_dist=False)

    def configure_optimizers(self) -> Any:
        s = self.settings
        # No decay on biases and LayerNorm weights: the 1-D parameters.
        named = [(plain_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n not in self.no_decay],
             "weight_decay": s["weight_decay"]},
            {"params": [p for n, p in named if n in self.no_decay], "weight_decay": 0.0},
        ]  # fmt: skip
        total = int(self.trainer.estimated_stepping_batches)
        self.schedule = choose_schedule(s["learning_rate"], s["warmup_steps"], s["preset"], total)
        if self.report is not None and self.trainer.is_global_zero:
            self.report(self.schedule.describe())
        optimizer = torch.optim.AdamW(groups, lr=self.schedule.learning_rate)
        warmup, schedule = self.schedule.warmup_steps, s["schedule"]

        def factor(step: int) -> float:
            return lr_factor(step, warmup, total, schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        schedule_step = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule_step}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        from pytorch_lightning.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning refuses norm clipping under FSDP; FSDP's own clip sees every shard.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # type: ignore[union-attr]
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def total_tokens(self) -> int:
        """Input tokens trained on so far, all ranks (a collective: call on every rank)."""
        here = self.trainer.strategy.reduce(self.tokens_seen.clone(), reduce_op="sum")
        return self.tokens_before + int(here)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["convcli"] = {
            "tokens": self.total_tokens(),
            "tokenizer": self.tokenizer_files,
            "data": self.data_identity,
            "world_size": self.trainer.world_size,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("convcli", {})
        self.tokens_before = int(saved.get("tokens", 0))
        world = saved.get("world_size")
        if world is not None and self._trainer is not None and world != self.trainer.world_size:
            # The saved data position counts this many ranks' batches: another count
            # would silently skip or repeat data.
            raise ConvcliError(
                f"`resume`: the checkpoint was written by {world} processes, this run has "
                f"{self.trainer.world_size}; resume with the same `devices` and `num_nodes`",
                param=("resume", "devices", "num_nodes"),
            )
