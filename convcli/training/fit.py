"""Orchestration of `convcli train`: check inputs, build, fit, resume, export.

    RUN_DIR/train.yaml                   the resolved settings
    RUN_DIR/checkpoints/step-NNNNNNN.ckpt  Lightning checkpoints (optimizer state included)
    RUN_DIR/logs/version_N/              CSV or TensorBoard metrics
    RUN_DIR/final/  RUN_DIR/best/        complete Hugging Face model folders (+ train.yaml)

Scaling out is Lightning's job: accelerator, devices, num_nodes and strategy pass
through; the batch sampler gives each rank its own batches; only rank 0 writes folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from convcli.data.shards import Shards
from convcli.errors import ConvcliError, UsageError
from convcli.modelfolder import ModelMeta, load_model_folder, save_model_folder
from convcli.settings import to_dict, to_yaml
from convcli.tokenizer import ConversationTokenizer
from convcli.training.batching import BatchPlan, padding_fraction
from convcli.training.callbacks import (
    BestFolder,
    Reseed,
    StderrProgressBar,
    StepCheckpoints,
    step_checkpoints,
)
from convcli.training.datamodule import ConversationData
from convcli.training.module import ConversationLM
from convcli.training.settings import TrainSettings

# GPT-2 shapes. tiny is for trying things out on a laptop (~1M parameters with a small
# vocabulary): two wide layers learn faster per second of CPU than four narrow ones, and a
# model this small underfits, so dropout only slows it down. small/medium are GPT-2 117M/345M.
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_embd": 192, "n_head": 4, "n_positions": 512, **NO_DROPOUT},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024},
}
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train.yaml"


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    steps: int
    tokens: int
    seconds: float
    val_loss: float | None
    final: Path | None
    best: Path | None
    padding: float
    is_global_zero: bool

    @property
    def val_ppl(self) -> float | None:
        import math

        return None if self.val_loss is None else math.exp(min(self.val_loss, 50.0))


# -- checks ----------------------------------------------------------------------------------


def check_settings(s: TrainSettings) -> None:
    """Reject impossible option combinations with one line naming the option."""
    if s.data is None:
        raise UsageError("--data is required (a shard directory from `convcli prepare`)")
    if s.output is None:
        raise UsageError("--output is required (the run directory)")
    if (s.model is None) == (s.preset is None):
        raise UsageError("give exactly one of --model NAME_OR_PATH or --preset tiny|small|medium")
    if s.preset is not None and s.preset not in PRESETS:
        raise UsageError(f"--preset: unknown preset {s.preset!r} (choose {', '.join(PRESETS)})")
    positive = {
        "--batch-tokens": s.batch_tokens, "--accumulate": s.accumulate,
        "--val-every": s.val_every, "--save-every": s.save_every,
        "--keep-checkpoints": s.keep_checkpoints, "--num-nodes": s.num_nodes,
        "--batch-size": s.batch_size or 1, "--max-steps": s.max_steps or 1,
        "--max-epochs": s.max_epochs or 1,
    }  # fmt: skip
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if s.learning_rate <= 0 or s.weight_decay < 0 or s.grad_clip < 0 or s.warmup_steps < 0:
        raise UsageError("--learning-rate must be > 0; --weight-decay, --grad-clip, "
                         "--warmup-steps must be >= 0")  # fmt: skip


def open_shards(path: Path) -> tuple[Shards, ConversationTokenizer]:
    """The shard directory and its tokenizer, checked against each other and non-empty."""
    shards = Shards(path)
    tokenizer = ConversationTokenizer.from_pretrained(shards.tokenizer_path)
    recorded = (shards.manifest.get("tokenizer") or {}).get("fingerprint")
    if recorded and recorded != tokenizer.fingerprint():
        raise ConvcliError(
            f"{path}: manifest does not match its tokenizer folder (fingerprint {recorded} "
            f"in the manifest, {tokenizer.fingerprint()} on disk); run `convcli prepare` again"
        )
    if "train" not in shards.manifest["splits"] or not len(shards.split("train")):
        raise ConvcliError(f"{path}: the training split is empty; nothing to train on")
    return shards, tokenizer


def find_checkpoint(s: TrainSettings) -> Path | None:
    """The checkpoint to resume from: --resume auto (newest in the run) or a path."""
    if s.resume is None:
        return None
    assert s.output is not None
    if s.resume != "auto":
        path = Path(s.resume)
        if not path.is_file():
            raise ConvcliError(f"--resume: checkpoint not found: {path}")
        return path
    found = step_checkpoints(s.output / CHECKPOINTS)
    if not found:
        raise ConvcliError(f"--resume auto: nothing to resume in {s.output / CHECKPOINTS}")
    return found[-1][1]


def prepare_output(s: TrainSettings, resuming: bool) -> None:
    """Refuse to mix two runs in one directory; --overwrite clears the old one."""
    assert s.output is not None
    if s.output.exists() and not s.output.is_dir():
        raise ConvcliError(f"--output: {s.output} is a file, not a directory")
    old = [s.output / n for n in (CHECKPOINTS, "final", "logs") if (s.output / n).exists()]
    if old and not resuming:
        if not s.overwrite:
            raise ConvcliError(
                f"{s.output} already holds a run; pass --resume auto to continue it "
                "or --overwrite to start over"
            )
        for path in [*old, s.output / "best"]:
            shutil.rmtree(path, ignore_errors=True)
    s.output.mkdir(parents=True, exist_ok=True)


# -- the model -------------------------------------------------------------------------------


def start_model(
    s: TrainSettings, tokenizer: ConversationTokenizer
) -> tuple[torch.nn.Module, ModelMeta]:
    """A model whose vocabulary fits the shards' tokenizer, and the metadata to save with it."""
    if s.preset is not None:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **PRESETS[s.preset],
        )
        model = GPT2LMHeadModel(config)
        token_types = True if s.token_types is None else s.token_types
        source = f"preset:{s.preset}"
    else:
        assert s.model is not None
        loaded = load_model_folder(s.model, device="cpu", dtype=torch.float32)
        check_vocabulary(s.model, loaded.tokenizer, s.data, tokenizer)
        model = loaded.model
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))  # e.g. an added <sep>
        token_types = loaded.meta.token_types if s.token_types is None else s.token_types
        source = s.model
    meta = ModelMeta(
        token_types=token_types,
        sep_token_id=tokenizer.sep_token_id,
        reverse=s.reverse,
        made_by="train",
        source=source,
    )
    return model.train(), meta


def check_vocabulary(
    model_name: str, model_tok: ConversationTokenizer, data: Any, data_tok: ConversationTokenizer
) -> None:
    """The shards must use the model's tokenizer, or one that only adds tokens to it."""
    if model_tok.fingerprint() == data_tok.fingerprint():
        return
    data_vocab = data_tok.tokenizer.get_vocab()
    model_vocab = model_tok.tokenizer.get_vocab()
    if all(data_vocab.get(token) == i for token, i in model_vocab.items()):
        return
    raise ConvcliError(
        f"{data} was prepared with a different tokenizer (fingerprint {data_tok.fingerprint()}) "
        f"than the model {model_name} ({model_tok.fingerprint()}); run `convcli prepare` "
        f"with --tokenizer {model_name}"
    )


def context_length(model: torch.nn.Module) -> int | None:
    config = model.config  # type: ignore[attr-defined]
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_checkpoint(path: Path, config: dict[str, Any]) -> None:
    """A clear line when the checkpoint is not ours or belongs to another model shape."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:
        raise ConvcliError(f"--resume: {path} is not a readable checkpoint: {exc}") from None
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict):
        raise ConvcliError(f"--resume: {path} is not a convcli training checkpoint")
    keys = ("model_type", "vocab_size", "n_layer", "n_embd", "n_head")
    differ = [k for k in keys if saved.get(k) != config.get(k)]
    if differ:
        what = ", ".join(f"{k} {saved.get(k)} vs {config.get(k)}" for k in differ)
        raise ConvcliError(f"--resume: {path} belongs to a different model ({what})")


# -- the run ---------------------------------------------------------------------------------


def _devices(value: str) -> int | str:
    return int(value) if re.fullmatch(r"-?\d+", value.strip()) else value


def _rank_zero_before_launch() -> bool:
    """Rank 0 before Lightning has started the other processes (they get these variables)."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep Lightning's hardware banner and hints off the terminal; keep real warnings."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*smaller than the logging interval.*",
            ".*Checkpoint directory .* exists and is not empty.*",
            ".*`isinstance.*LeafSpec.*",
            # val_loss/val_ppl are reduced across ranks by the module before logging
            ".*It is recommended to use `self.log\\('val_.*sync_dist=True.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _logger(s: TrainSettings) -> Any:
    assert s.output is not None
    if s.logger == "tensorboard":
        try:
            from pytorch_lightning.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(s.output), name="logs", default_hp_metric=False)
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"--logger tensorboard needs the tensorboard package ({exc})"
            ) from None
    from pytorch_lightning.loggers import CSVLogger

    return CSVLogger(save_dir=str(s.output), name="logs")


def train(
    s: TrainSettings,
    *,
    report: Callable[[str], None] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    progress: bool = True,
) -> TrainResult:
    """Run `convcli train` with these settings; see the module docstring for the outputs.

    `report` receives short progress lines (rank 0 only); `callbacks` are extra
    Lightning callbacks (tests use one to simulate a crash).
    """
    from transformers.utils import logging as hf_logging

    started = time.monotonic()
    hf_logging.disable_progress_bar()  # one bar (Lightning's) is enough
    check_settings(s)
    assert s.data is not None and s.output is not None
    say = report if report and _rank_zero_before_launch() else (lambda _: None)
    _, tokenizer = open_shards(s.data)
    checkpoint = find_checkpoint(s)
    if _rank_zero_before_launch():
        prepare_output(s, resuming=checkpoint is not None)
        (s.output / CONFIG_FILE).write_text(to_yaml(s, header="convcli train"), encoding="utf-8")

    pl.seed_everything(s.seed, workers=True, verbose=False)
    model, meta = start_model(s, tokenizer)
    config = model.config.to_dict()  # type: ignore[attr-defined]
    if checkpoint is not None:
        check_checkpoint(checkpoint, config)
    module = ConversationLM(to_dict(s), config, to_dict(meta), model=model)
    plan = BatchPlan(batch_tokens=s.batch_tokens, batch_size=s.batch_size)
    data = ConversationData(
        s.data, sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id, plan=plan,
        train_on=s.train_on, reverse=s.reverse, max_length=context_length(model),
        token_types=meta.token_types, seed=s.seed, num_workers=s.num_workers,
    )  # fmt: skip
    lengths = data.train.lengths()
    padding = padding_fraction(data.sampler("train").all_batches(0), lengths)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"training {meta.source} ({params / 1e6:.1f}M parameters"
        f"{', reverse' if s.reverse else ''}, token types {'on' if meta.token_types else 'off'}) "
        f"on {len(lengths)} examples ({int(lengths.sum())} tokens), "
        f"padding {padding:.1%}" + (f"; resuming from {checkpoint}" if checkpoint else "")
    )

    yaml_text = to_yaml(s, header="convcli train: the resolved settings of this model")

    def export(name: str, module: ConversationLM, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        folder_meta = replace(
            meta,
            extra={
                "step": trainer.global_step,
                "train_on": s.train_on,
                "val_loss": module.val_loss,
            },
        )
        save_model_folder(
            module.model, tokenizer, folder_meta, s.output / name,  # type: ignore[arg-type, operator]
            overwrite=True, extra_files={CONFIG_FILE: yaml_text},
        )  # fmt: skip

    best = BestFolder(export)
    has_valid = data.valid is not None
    max_epochs = s.max_epochs if s.max_epochs is not None else (1 if s.max_steps is None else -1)
    with _quiet_lightning():
        try:
            trainer = pl.Trainer(
                accelerator=s.accelerator,
                devices=_devices(s.devices),
                num_nodes=s.num_nodes,
                strategy=s.strategy,
                precision=s.precision,  # type: ignore[arg-type]
                max_steps=s.max_steps if s.max_steps is not None else -1,
                max_epochs=max_epochs,
                accumulate_grad_batches=s.accumulate,
                gradient_clip_val=s.grad_clip or None,
                val_check_interval=s.val_every * s.accumulate if has_valid else None,
                check_val_every_n_epoch=None,
                limit_val_batches=1.0 if has_valid else 0,
                num_sanity_val_steps=0,
                logger=_logger(s),
                callbacks=[
                    StepCheckpoints(s.output / CHECKPOINTS, s.save_every, s.keep_checkpoints),
                    Reseed(s.seed),
                    best,
                    *([StderrProgressBar()] if progress else []),
                    *callbacks,
                ],
                enable_checkpointing=False,
                enable_progress_bar=progress,
                enable_model_summary=False,
                use_distributed_sampler=False,
                log_every_n_steps=min(50, s.val_every),
                default_root_dir=str(s.output),
            )
        except (MisconfigurationException, ValueError, TypeError, RuntimeError) as exc:
            raise UsageError(f"Lightning refused the options: {exc}") from None
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(checkpoint) if checkpoint else None)
        except SystemExit as exc:  # Lightning exits on Ctrl-C and SIGTERM
            if not trainer.interrupted:
                raise
            if isinstance(exc, SIGTERMException):
                raise ConvcliError(
                    f"terminated at step {trainer.global_step}; continue with --resume auto"
                ) from None
            raise KeyboardInterrupt from None
        if has_valid and best.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)
        tokens = module.total_tokens()
        export("final", module, trainer)

    has_best = trainer.is_global_zero and (s.output / "best").is_dir()
    return TrainResult(
        output=s.output,
        steps=trainer.global_step,
        tokens=tokens,
        seconds=time.monotonic() - started,
        val_loss=module.val_loss,
        final=s.output / "final",
        best=s.output / "best" if has_best else None,
        padding=padding,
        is_global_zero=trainer.is_global_zero,
    )
