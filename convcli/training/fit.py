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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from convcli.errors import ConvcliError, Interrupted, UsageError
from convcli.modelfolder import ModelMeta, load_model_folder
from convcli.outputs import hold_output
from convcli.settings import to_dict, to_yaml
from convcli.tokenizer import ConversationTokenizer
from convcli.training.batching import BatchPlan, padding_fraction
from convcli.training.callbacks import (
    BestFolder,
    EarlyStop,
    Reseed,
    StderrProgressBar,
    StderrProgressLines,
    StepCheckpoints,
)
from convcli.training.checkpoint_files import AtomicCheckpointIO
from convcli.training.checks import (
    CHECKPOINTS,
    check_resume,
    check_run_inputs,
    check_settings,
    check_vocabulary,
    data_identity,
    find_checkpoint,
    open_shards,
    prepare_output,
)
from convcli.training.datamodule import ConversationData
from convcli.training.export import FolderExport, tokenizer_files
from convcli.training.module import ConversationLM
from convcli.training.schedule import Schedule
from convcli.training.settings import TrainSettings
from convcli.training.stopping import SaveOnSignal, Stopped

# GPT-2 shapes. tiny is for trying things out on a laptop (~1M parameters with a small
# vocabulary): two wide layers learn faster per second of CPU than four narrow ones, and a
# model this small underfits, so dropout only slows it down. small/medium are GPT-2 117M/345M.
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_embd": 192, "n_head": 4, "n_positions": 512, **NO_DROPOUT},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024},
}
CONFIG_FILE = "train.yaml"
Progress = Literal["bar", "lines", "off"]
# Below this many training tokens per parameter, a model from scratch memorises instead of
# learning language (compute-optimal training uses ~20).
SMALL_CORPUS_TOKENS_PER_PARAM = 2.0


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
    best_step: int | None = None
    """The step whose weights best/ holds (lowest validation loss)."""
    best_val_loss: float | None = None
    worse_since_best: int = 0
    """Validations after the best one (all worse): > 0 means the loss stopped improving."""
    stopped_early: bool = False
    """The run ended because of `early_stop`, before `max_steps`/`max_epochs`."""
    schedule: Schedule | None = None

    @property
    def val_ppl(self) -> float | None:
        import math

        return None if self.val_loss is None else math.exp(min(self.val_loss, 50.0))


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


def context_length(model: torch.nn.Module) -> int | None:
    config = model.config  # type: ignore[attr-defined]
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


# -- the run ---------------------------------------------------------------------------------


def _devices(value: str) -> int | str:
    return int(value) if re.fullmatch(r"-?\d+", value.strip()) else value


# The rank variables of Lightning's own launcher, torchrun, and cluster launchers that start
# every process themselves (SLURM srun, Open MPI, LSF's jsrun): any non-zero one is not rank 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                  "PMI_RANK", "JSM_NAMESPACE_RANK")  # fmt: skip


def _rank_zero_before_launch() -> bool:
    """Rank 0 before Lightning has started the other processes (they get these variables),
    or rank 0 of those a cluster launcher started: the one that locks and prepares the run."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in RANK_VARIABLES)


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
            # a run resumed without `early_stop` that had it before: the user's choice
            ".*callbacks used to create the checkpoint need to be provided.*EarlyStop.*",
            # val_loss/val_ppl are reduced across ranks by the module before logging
            ".*It is recommended to use `self.log\\('val_.*sync_dist=True.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@contextlib.contextmanager
def _own_process_group() -> Iterator[None]:
    """Destroy the process group Lightning opened for this run once the run is over.

    Lightning leaves it open; at interpreter exit Gloo's worker threads are then torn down
    with the interpreter and the process can abort (SIGABRT, "terminate called without an
    active exception") after a run that succeeded. A group the caller opened is theirs."""
    dist = torch.distributed
    opened_before = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not opened_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _progress_callbacks(progress: Progress | bool) -> list[pl.Callback]:
    if progress in (True, "bar"):
        return [StderrProgressBar()]
    return [StderrProgressLines()] if progress == "lines" else []


def _silent(line: str) -> None:
    """A report that says nothing (module-level: a spawned process must pickle it)."""


def _logger(s: TrainSettings) -> Any:
    assert s.output is not None
    if s.logger == "tensorboard":
        try:
            from pytorch_lightning.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(s.output), name="logs", default_hp_metric=False)
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"`logger` tensorboard needs the tensorboard package ({exc})", param="logger"
            ) from None
    from pytorch_lightning.loggers import CSVLogger

    return CSVLogger(save_dir=str(s.output), name="logs")


def train(
    s: TrainSettings,
    *,
    report: Callable[[str], None] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    progress: Progress | bool = True,
) -> TrainResult:
    """Run `convcli train` with these settings; see the module docstring for the outputs.

    `report` receives short progress lines (rank 0 only); `callbacks` are extra
    Lightning callbacks (tests use one to simulate a crash). `progress` on stderr: "bar"
    (True; for a terminal), "lines" (a line every few seconds, for a log file) or "off".
    """
    check_settings(s)
    assert s.data is not None and s.output is not None
    check_run_inputs(s)
    # The run directory is locked for the whole run (rank 0 of the launching process only:
    # the processes Lightning starts run this again, inside the same run).
    lock = hold_output(s.output) if _rank_zero_before_launch() else contextlib.nullcontext()
    with lock, _torch_threads(s.threads):
        return _train(s, report=report, callbacks=callbacks, progress=progress)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with this many torch intra-op threads (None: the default), then restore."""
    from convcli.inference.settings import default_threads

    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    s: TrainSettings,
    *,
    report: Callable[[str], None] | None,
    callbacks: Sequence[pl.Callback],
    progress: Progress | bool,
) -> TrainResult:
    from transformers.utils import logging as hf_logging

    assert s.data is not None and s.output is not None
    started = time.monotonic()
    hf_logging.disable_progress_bar()  # one bar (Lightning's) is enough
    say = report if report and _rank_zero_before_launch() else _silent
    shards, tokenizer = open_shards(s.data)
    checkpoint, resume_warnings = find_checkpoint(s)
    for warning in resume_warnings:
        say(warning)
    pl.seed_everything(s.seed, workers=True, verbose=False)
    model, meta = start_model(s, tokenizer)
    config = model.config.to_dict()  # type: ignore[attr-defined]
    identity = data_identity(shards)
    if checkpoint is not None:
        check_resume(checkpoint, s, config, meta.token_types, identity)
    if _rank_zero_before_launch():  # only once the run is known to be acceptable
        prepare_output(s, resuming=checkpoint is not None)
        (s.output / CONFIG_FILE).write_text(to_yaml(s, header="convcli train"), encoding="utf-8")
    module = ConversationLM(to_dict(s), config, to_dict(meta), model=model)
    module.tokenizer_files, module.data_identity = tokenizer_files(tokenizer), identity
    plan = BatchPlan(batch_tokens=s.batch_tokens, batch_size=s.batch_size)
    data = ConversationData(
        s.data, sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id, plan=plan,
        train_on=s.train_on, reverse=s.reverse, max_length=context_length(model),
        token_types=meta.token_types, seed=s.seed, num_workers=s.num_workers,
    )  # fmt: skip
    lengths = data.train.lengths()
    positions = context_length(model)
    too_long = int((data.train.split.lengths() > positions).sum()) if positions else 0
    if too_long:
        say(
            f"warning: {too_long} training examples are longer than the model's {positions} "
            f"positions and lose their oldest turns; prepare with `max_length` {positions}"
        )
    padding = padding_fraction(data.sampler("train").all_batches(0), lengths)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"training {meta.source} ({params / 1e6:.1f}M parameters"
        f"{', reverse' if s.reverse else ''}, token types {'on' if meta.token_types else 'off'}) "
        f"on {len(lengths)} examples ({int(lengths.sum())} tokens), "
        f"padding {padding:.1%}" + (f"; resuming from {checkpoint}" if checkpoint else "")
    )
    note = small_corpus_note(s, int(lengths.sum()), params)
    if note and checkpoint is None:
        say(note)

    yaml_text = to_yaml(s, header="convcli train: the resolved settings of this model")

    export = FolderExport(
        s.output, tokenizer, meta, train_on=s.train_on, extra_files={CONFIG_FILE: yaml_text}
    )
    best = BestFolder(export)
    has_valid = data.valid is not None
    if s.early_stop is not None and not has_valid:
        raise UsageError(
            f"`early_stop` needs a validation split, and {s.data} has none "
            "(prepare with a validation fraction)",
            param="early_stop",
        )
    early = [EarlyStop(patience=s.early_stop)] if s.early_stop is not None else []
    module.report = say
    steps = StepCheckpoints(s.output / CHECKPOINTS, s.save_every, s.keep_checkpoints)
    stopper = SaveOnSignal(steps)
    max_epochs = s.max_epochs if s.max_epochs is not None else (1 if s.max_steps is None else -1)
    with _quiet_lightning(), _own_process_group():
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
                    steps,
                    stopper,  # after `steps`: it saves through it
                    Reseed(s.seed),
                    best,
                    *early,
                    *_progress_callbacks(progress),
                    *callbacks,
                ],
                enable_checkpointing=False,
                # checkpoints complete or absent (DeepSpeed writes its own folders)
                plugins=[] if "deepspeed" in s.strategy else [AtomicCheckpointIO()],
                enable_progress_bar=progress in (True, "bar"),
                enable_model_summary=False,
                use_distributed_sampler=False,
                log_every_n_steps=min(50, s.val_every),
                default_root_dir=str(s.output),
            )
        except (MisconfigurationException, ValueError, TypeError, RuntimeError) as exc:
            raise UsageError(f"Lightning refused the options: {exc}") from None
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(checkpoint) if checkpoint else None)
        except Stopped as stop:  # SIGTERM or Ctrl-C: a checkpoint saved at the step's end
            raise Interrupted(stop.message(), signum=stop.signum, param="resume") from None
        except SystemExit as exc:  # Lightning exits on Ctrl-C and SIGTERM
            if not trainer.interrupted:
                raise
            if isinstance(exc, SIGTERMException):
                raise ConvcliError(
                    f"terminated at step {trainer.global_step}; continue with `resume` auto",
                    param="resume",
                ) from None
            raise KeyboardInterrupt from None
        finally:
            stopper.restore()  # this process's Ctrl-C and SIGTERM are its own again
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
        best_step=best.best_step if best.best is not None else None,
        best_val_loss=best.best,
        worse_since_best=best.validations_since_best(),
        stopped_early=bool(early) and early[0].stopped_step is not None,
        schedule=module.schedule,
    )


def small_corpus_note(s: TrainSettings, tokens: int, params: int) -> str | None:
    """A note when a model from scratch has far too little text for its size."""
    ratio = tokens / max(params, 1)
    if s.preset is None or ratio >= SMALL_CORPUS_TOKENS_PER_PARAM:
        return None
    return (
        f"note: {tokens:,} training tokens for {params / 1e6:.1f}M parameters "
        f"({ratio:.2g} tokens per parameter): from scratch, a model needs ~20 per parameter "
        "to learn language and will mostly memorise this corpus (watch the validation loss). "
        "Fine-tuning a pretrained model learns far more from it: `model` gpt2 or a converted "
        "DialoGPT folder, with shards prepared with that model's tokenizer"
    )
