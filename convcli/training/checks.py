"""Input checks of `convcli train`: options, shards, output directory, resume checkpoint.

Each refuses a bad input with one line naming the option or the file, before any
model is built or any process is launched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from convcli.data.shards import Shards, check_contents
from convcli.errors import ConvcliError, UsageError
from convcli.outputs import MARKER, is_output_of, refuse_system_folder, write_marker
from convcli.tokenizer import ConversationTokenizer
from convcli.training.callbacks import step_checkpoints
from convcli.training.checkpoint_files import clean_temporaries, newest_readable
from convcli.training.settings import PRESETS as PRESET_NAMES
from convcli.training.settings import TrainSettings

CHECKPOINTS = "checkpoints"
# Settings that fix the data order and the loss: a resumed run with other values
# would not continue the same run.
SAME_ON_RESUME = ("train_on", "reverse", "batch_tokens", "batch_size", "seed", "accumulate")
# Restored from the checkpoint's optimizer state, so a new value would be ignored.
RESTORED_ON_RESUME = ("learning_rate", "weight_decay")


def check_settings(s: TrainSettings) -> None:
    """Reject impossible option combinations with one line naming the option."""
    if s.data is None:
        raise UsageError(
            "`data` is required (a shard directory from `convcli prepare`)", param="data"
        )
    if s.output is None:
        raise UsageError("`output` is required (the run directory)", param="output")
    if (s.model is None) == (s.preset is None):
        raise UsageError("give exactly one of `model` NAME_OR_PATH or `preset` tiny|small|medium",
                         param=("model", "preset"))  # fmt: skip
    if s.preset is not None and s.preset not in PRESET_NAMES:
        choose = ", ".join(PRESET_NAMES)
        raise UsageError(f"`preset`: unknown preset {s.preset!r} (choose {choose})", param="preset")
    positive = {
        "batch_tokens": s.batch_tokens, "accumulate": s.accumulate,
        "val_every": s.val_every, "save_every": s.save_every,
        "keep_checkpoints": s.keep_checkpoints, "num_nodes": s.num_nodes,
        "batch_size": s.batch_size or 1, "max_steps": s.max_steps or 1,
        "max_epochs": s.max_epochs or 1, "early_stop": 1 if s.early_stop is None else s.early_stop,
        "threads": 1 if s.threads is None else s.threads,
    }  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"`{name}` must be at least 1, got {value}", param=name)
    if s.reverse and s.train_on == "weights":
        # DialoGPT weights mark replies; reversed, the only weighted turn would come first
        # with nothing before it, and the source (the target of MMI) would never be trained.
        raise UsageError("`reverse` cannot use `train_on` weights: use responses (the default)",
                         param=("reverse", "train_on"))  # fmt: skip
    learning_rate = 1.0 if s.learning_rate is None else s.learning_rate
    warmup = s.warmup_steps or 0
    if learning_rate <= 0 or s.weight_decay < 0 or s.grad_clip < 0 or warmup < 0:
        names = ("learning_rate", "weight_decay", "grad_clip", "warmup_steps")
        raise UsageError("`learning_rate` must be > 0; `weight_decay`, `grad_clip`, "
                         "`warmup_steps` must be >= 0", param=names)  # fmt: skip


def open_shards(path: Path) -> tuple[Shards, ConversationTokenizer]:
    """The shard directory and its tokenizer, checked against each other and non-empty."""
    shards = Shards(path)
    tokenizer = ConversationTokenizer.from_pretrained(shards.tokenizer_path)
    recorded = (shards.manifest.get("tokenizer") or {}).get("fingerprint")
    if not recorded:  # a swapped tokenizer would go unnoticed
        raise ConvcliError(
            f"{path}: the manifest records no tokenizer fingerprint, so its tokenizer folder "
            "cannot be trusted to be the one the ids were made with; run `convcli prepare` again"
        )
    if recorded != tokenizer.fingerprint():
        raise ConvcliError(
            f"{path}: manifest does not match its tokenizer folder (fingerprint {recorded} "
            f"in the manifest, {tokenizer.fingerprint()} on disk); run `convcli prepare` again"
        )
    if "train" not in shards.manifest["splits"] or not len(shards.split("train")):
        raise ConvcliError(f"{path}: the training split is empty; nothing to train on")
    check_contents(shards, len(tokenizer))  # before the first step, not as a crash in it
    return shards, tokenizer


def find_checkpoint(s: TrainSettings) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from: resume="auto" (the newest that reads back in the
    run) or a path; and warnings for the user (newer checkpoints skipped as unreadable)."""
    if s.resume is None:
        return None, []
    assert s.output is not None
    if s.resume != "auto":
        path = Path(s.resume)
        if not path.is_file():
            raise ConvcliError(f"`resume`: checkpoint not found: {path}", param="resume")
        return path, []
    found = step_checkpoints(s.output / CHECKPOINTS)
    if not found:
        raise ConvcliError(
            f"`resume` auto: nothing to resume in {s.output / CHECKPOINTS}", param="resume"
        )
    path, warnings = newest_readable(found)
    if path is None:
        raise ConvcliError(
            f"`resume` auto: no readable checkpoint in {s.output / CHECKPOINTS} "
            f"({'; '.join(warnings)})",
            param="resume",
        )
    return path, warnings


RUN_PARTS = (CHECKPOINTS, "final", "best", "logs")
"""What a run writes in its directory; `overwrite` removes these and nothing else."""


def check_run_inputs(s: TrainSettings) -> None:
    """The run directory's parts are rewritten (final/, best/) or, with `overwrite`,
    deleted: a `model` or `data` inside them would be destroyed by this very run."""
    assert s.output is not None
    refuse_system_folder(s.output)
    run = s.output.expanduser().resolve()
    named = {"model": s.model, "data": s.data}
    for param, value in named.items():
        if value is None or not Path(value).exists():
            continue  # a hub name
        source = Path(value).expanduser().resolve()
        parts = [run / part for part in RUN_PARTS]
        if source == run or any(source == p or p in source.parents for p in parts):
            raise UsageError(
                f"`{param}` {value} lies in the run directory `output` {s.output}, which this "
                f"run rewrites; copy it elsewhere or choose another `output`",
                param=(param, "output"),
            )


def prepare_output(s: TrainSettings, resuming: bool) -> None:
    """Refuse to mix two runs in one directory; `overwrite` clears the old one's parts,
    and only when the directory is a previous run (its marker)."""
    assert s.output is not None
    if s.output.exists() and not s.output.is_dir():
        raise ConvcliError(f"`output`: {s.output} is a file, not a directory", param="output")
    old = [s.output / n for n in RUN_PARTS if (s.output / n).exists()]
    if old and not resuming:
        if not s.overwrite:
            raise ConvcliError(
                f"{s.output} already holds a run; use `resume` auto to continue it "
                "or `overwrite` to start over",
                param=("resume", "overwrite"),
            )
        if not is_output_of(s.output, "train"):
            raise ConvcliError(
                f"{s.output} holds {', '.join(p.name for p in old)} but is not a previous run "
                f"of `convcli train` (no {MARKER}); refusing to delete them: choose another "
                "`output` or remove them yourself",
                param="output",
            )
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    s.output.mkdir(parents=True, exist_ok=True)
    write_marker(s.output, "train")
    clean_temporaries(s.output / CHECKPOINTS)  # from saves killed midway


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
        f"than the model {model_name} ({model_tok.fingerprint()}); prepare it again "
        f"with `tokenizer` {model_name}"
    )


def data_identity(shards: Shards) -> dict[str, Any]:
    """What identifies a shard directory's training data (paths may move, this does not)."""
    split = shards.split("train")
    return {
        "train_examples": len(split),
        "train_tokens": int(split.lengths().sum()),
        "tokenizer": (shards.manifest.get("tokenizer") or {}).get("fingerprint"),
    }


def _shown(value: Any) -> str:
    return "default" if value is None else str(value)


def check_resume(
    path: Path,
    s: TrainSettings,
    config: dict[str, Any],
    token_types: bool,
    data: dict[str, Any],
) -> None:
    """Refuse a checkpoint that would not continue this run: another model, data or options."""
    from convcli.conversion.checkpoint import load_weights_only

    try:
        checkpoint = load_weights_only(path)  # tensors and plain values only, like Lightning
    except ConvcliError as exc:
        raise ConvcliError(f"`resume`: {exc}", param="resume") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict):
        raise ConvcliError(f"`resume`: {path} is not a convcli training checkpoint", param="resume")
    saved = hparams["config"]
    keys = ("model_type", "vocab_size", "n_layer", "n_embd", "n_head")
    differ = [k for k in keys if saved.get(k) != config.get(k)]
    if differ:
        what = ", ".join(f"{k} {saved.get(k)} vs {config.get(k)}" for k in differ)
        raise ConvcliError(
            f"`resume`: {path} belongs to a different model ({what})", param="resume"
        )

    old = hparams.get("settings") or {}
    now = vars(s)
    changed = [k for k in (*SAME_ON_RESUME, *RESTORED_ON_RESUME) if k in old and old[k] != now[k]]
    if old.get("batch_size") is not None and s.batch_size is not None and "batch_tokens" in changed:
        changed.remove("batch_tokens")  # unused with a fixed batch size
    old_types = (hparams.get("meta") or {}).get("token_types")
    if old_types is not None and old_types != token_types:
        changed.append("token_types")
    if changed:
        what = ", ".join(
            f"`{k}` {_shown(old.get(k, old_types))} (now {_shown(now.get(k, token_types))})"
            for k in changed
        )
        raise ConvcliError(
            f"`resume`: {path} was trained with {what}; resume with the same settings, or "
            "`convcli convert` it and start a new run from that folder with `model`",
            param=("resume", *changed, "model"),
        )
    old_data = (checkpoint.get("convcli") or {}).get("data")
    if old_data and old_data != data:
        raise ConvcliError(
            f"`resume`: {path} was trained on other data ({old_data.get('train_examples')} "
            f"training examples, {old_data.get('train_tokens')} tokens) than `data` {s.data} "
            f"({data['train_examples']} examples, {data['train_tokens']} tokens)",
            param=("resume", "data"),
        )
