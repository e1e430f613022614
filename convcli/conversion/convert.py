"""Original DialoGPT checkpoints (and convcli train .ckpt files) into verified model folders.

    report = convert_checkpoint("medium_ft.pkl", "dialogpt-medium", tokenizer="gpt2-vocab/")

The steps: read the file with `weights_only=True` (memory-mapped when it is a zip),
rename its keys to Hugging Face's GPT-2 names, infer the size from the tensors, compute
reference logits with a GPT-2 built around those very tensors (no copy, no random
init; in a thread, while the main one writes the folder atomically, casting each
tensor on its way into the file) and, before moving the folder into place, load it
with plain transformers and compare logits.

Memory: about one copy of the weights. The reference runs in float32 one block at a
time; each tensor is cast through a small buffer into the file and then released;
verification maps the written file instead of reading it into memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.conversion.checkpoint import Checkpoint, hparam, read_checkpoint, release_pages
from convcli.conversion.folder import write_folder
from convcli.conversion.gpt2 import (
    LM_HEAD,
    WTE,
    build_model,
    check_sizes,
    gpt2_config,
    infer_shape,
    normalize_keys,
)
from convcli.conversion.settings import DTYPES
from convcli.errors import ConvcliError, UsageError
from convcli.modelfolder import (
    META_FILE,
    ModelMeta,
    quiet_weight_bars,
)
from convcli.outputs import check_output, hold_output, recover_leftovers, write_atomically

if TYPE_CHECKING:
    import torch
    from transformers import GPT2Config

    from convcli.tokenizer import ConversationTokenizer

DEFAULT_TOKENIZER = "gpt2"  # DialoGPT kept GPT-2's vocabulary unchanged
# Architecture settings a train checkpoint's recorded model config may change.
_CONFIG_HINTS = (
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
)

Progress = Callable[[str, int, int], None]
"""Called as `progress(stage, done, total)`; stages: load, convert, save, verify."""


@dataclass
class ConversionReport:
    """What `convert_checkpoint` wrote, and how well it matched the checkpoint."""

    path: Path
    source: str
    kind: str
    """`dialogpt` (a bare state dict) or `lightning` (a convcli train .ckpt)."""
    n_params: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    dtype: str
    source_dtype: str
    reverse: bool
    tied: bool
    dropped: list[str]
    """Original names of the keys left out: mask buffers, the lm_head copy of wte."""
    max_logit_diff: float | None
    """Largest |logit difference| against the original tensors; None without verification."""
    folder_bytes: int
    notes: list[str] = field(default_factory=list)
    """Things worth a warning (e.g. a tokenizer smaller than the embedding table)."""

    def summary(self) -> str:
        diff = "not verified" if self.max_logit_diff is None else f"{self.max_logit_diff:.3g}"
        return (
            f"wrote {self.path}: {self.n_params / 1e6:.1f}M parameters "
            f"({self.folder_bytes / 1e6:.1f} MB), {self.n_layer} layers, width {self.n_embd}, "
            f"{self.n_head} heads, {self.dtype}, max logit diff {diff}"
        )


def convert_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
    reverse: bool = False,
    n_head: int | None = None,
    n_layer: int | None = None,
    n_embd: int | None = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    extra_files: dict[str, str] | None = None,
) -> ConversionReport:
    """Convert a DialoGPT `.pkl` or a convcli train `.ckpt` into a model folder at `output`.

    `tokenizer` defaults to the one a train checkpoint records, else GPT-2's (from the
    hub: pass a folder with vocab.json + merges.txt to work offline). `n_layer` and
    `n_embd` are checks (an error if the tensors disagree); `n_head` overrides the
    64-wide-heads default and must divide the width. Nothing is left at `output`
    unless the whole folder was written (and verified). `extra_files` (name: text) are
    written into the folder with it (the CLI's resolved settings).
    """
    path, output = Path(checkpoint), Path(output)
    report_progress = progress or (lambda stage, done, total: None)
    if dtype not in DTYPES:
        raise UsageError(f"`dtype` {dtype!r} is not one of {', '.join(DTYPES)}", param="dtype")
    with hold_output(output):  # for the whole run: a second convert here fails at once
        recover_leftovers(output)
        check_output(output, "convert", overwrite=overwrite, inputs=[path])
        return _convert(
            path, output, report_progress, tokenizer=tokenizer, dtype=dtype, reverse=reverse,
            n_head=n_head, n_layer=n_layer, n_embd=n_embd, verify=verify, overwrite=overwrite,
            extra_files=extra_files,
        )  # fmt: skip


def _convert(
    path: Path,
    output: Path,
    report_progress: Progress,
    *,
    tokenizer: str | Path | None,
    dtype: str,
    reverse: bool,
    n_head: int | None,
    n_layer: int | None,
    n_embd: int | None,
    verify: bool,
    overwrite: bool,
    extra_files: dict[str, str] | None,
) -> ConversionReport:
    import torch

    tok = _tokenizer(tokenizer) if tokenizer is not None else None  # fail before the big load

    report_progress("load", 0, 1)
    ckpt = read_checkpoint(path)
    report_progress("load", 1, 1)
    notes: list[str] = []
    recorded_meta = _recorded_meta(ckpt)
    recorded = _recorded_config(ckpt)
    if recorded.get("model_type") not in (None, "gpt2"):
        raise ConvcliError(
            f"{path}: holds a {recorded['model_type']} model; convert handles GPT-2 "
            "checkpoints only"
        )
    if tok is None:
        tok = _recorded_tokenizer(ckpt, path, notes)
    sep = recorded_meta.get("sep_token_id")
    if isinstance(sep, int) and sep != tok.sep_token_id:
        raise ConvcliError(
            f"{path} was trained with sep id {sep}, but the tokenizer's is "
            f"{tok.sep_token_id}: not its tokenizer (wrong `tokenizer`?)"
        )
    state, dropped, origin = normalize_keys(ckpt.state, str(path))
    ckpt.state.clear()  # the renamed dict holds the tensors now: keep one reference only
    dropped += ckpt.ignored
    shape = infer_shape(state, str(path), origin)
    heads = check_sizes(
        shape,
        n_head=n_head or _int(recorded.get("n_head")) or _int(hparam(ckpt.hparams, "n_head")),
        n_layer=n_layer,
        n_embd=n_embd,
        head_source="`n_head`" if n_head else "the checkpoint's recorded n_head",
    )
    if len(tok) > shape.vocab_size:
        raise ConvcliError(
            f"the tokenizer has {len(tok)} tokens but {path} only {shape.vocab_size} embedding "
            "rows: they do not belong together (wrong `tokenizer`?)"
        )
    if len(tok) < shape.vocab_size:
        notes.append(
            f"the tokenizer has {len(tok)} tokens, the model {shape.vocab_size} embedding rows"
        )
    source_dtype = str(state[WTE].dtype).removeprefix("torch.")
    target = getattr(torch, dtype)
    config = gpt2_config(shape, heads, tied=LM_HEAD not in state, eos_id=tok.sep_token_id)
    for name in _CONFIG_HINTS:
        value = recorded.get(name)
        if value is not None:
            setattr(config, name, value)
    n_params = sum(t.numel() for t in state.values())

    inputs: list[torch.Tensor] = []
    if verify:
        from convcli.conversion.verify import sample_inputs

        inputs = sample_inputs(tok, shape.vocab_size, shape.n_positions)

    recorded_types = recorded_meta.get("token_types", hparam(ckpt.hparams, "token_types"))
    token_types = bool(recorded_types) if ckpt.kind == "lightning" else False
    if ckpt.kind == "lightning" and recorded_types is None:
        token_types = True
        notes.append("the checkpoint does not record token_types: assumed it was trained with them")
    recorded_reverse = recorded_meta.get("reverse", hparam(ckpt.hparams, "reverse"))
    meta = ModelMeta(
        token_types=token_types,
        sep_token_id=tok.sep_token_id,
        reverse=reverse or bool(recorded_reverse),
        made_by="convert",
        source=str(path),
        extra={
            "checkpoint_kind": ckpt.kind,
            "source_dtype": source_dtype,
            "dropped_keys": dropped,
            **({"global_step": ckpt.step} if ckpt.step is not None else {}),
        },
    )

    def tensor_written(tensor: torch.Tensor, done: int, total: int) -> None:
        if ckpt.mapped:
            release_pages(tensor)  # else the mapped file stays resident as it is read
        report_progress("convert", done, total)
        if done == total:
            report_progress("save", 0, 1)  # the tokenizer and the other small files

    max_diff: float | None = None

    def write(tmp: Path) -> None:
        nonlocal max_diff
        # Casts and writes each tensor, emptying `state`: verifying maps the written file.
        write_folder(
            tmp, state, target, config, tok, meta, extra_files=extra_files, written=tensor_written
        )
        report_progress("save", 1, 1)
        if reference is not None:
            from convcli.conversion.verify import verify_folder

            steps = iter(range(1, len(inputs) + 2))
            max_diff = verify_folder(
                tmp,
                inputs,
                reference.result(),
                dtype,
                step=lambda: report_progress("verify", next(steps), len(inputs) + 1),
            )
            meta.extra["verified_max_logit_diff"] = max_diff
            (tmp / META_FILE).write_text(meta.to_json() + "\n", encoding="utf-8")

    # The reference logits come from the original values (before any cast, float32
    # arithmetic), computed in a thread while the main one writes the folder: one is
    # arithmetic, the other memory and disk. The thread gets its own dict and config, as
    # writing empties `state` and fills in `config`.
    with ThreadPoolExecutor(1, thread_name_prefix="convcli-reference") as pool:
        reference = (
            pool.submit(_reference_logits, copy.deepcopy(config), dict(state), inputs)
            if verify
            else None
        )
        with quiet_weight_bars():
            written = write_atomically(output, write, overwrite=overwrite, command="convert")
    return ConversionReport(
        path=written,
        source=str(path),
        kind=ckpt.kind,
        n_params=n_params,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=heads,
        n_positions=shape.n_positions,
        vocab_size=shape.vocab_size,
        dtype=dtype,
        source_dtype=source_dtype,
        reverse=meta.reverse,
        tied=config.tie_word_embeddings,
        dropped=dropped,
        max_logit_diff=max_diff,
        folder_bytes=sum(f.stat().st_size for f in written.iterdir() if f.is_file()),
        notes=notes,
    )


def _reference_logits(
    config: GPT2Config, weights: dict[str, torch.Tensor], inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """float32 logits of a GPT-2 built around `weights` themselves (nothing copied)."""
    from convcli.conversion.verify import logits_of

    model = build_model(config, weights)
    try:
        return logits_of(model, inputs)
    finally:
        for parameter in model.parameters():  # `weights` stays the only owner of the tensors
            parameter.data = parameter.data.new_empty(0)
        del model


def _tokenizer(name: str | Path) -> ConversationTokenizer:
    from convcli.tokenizer import ConversationTokenizer

    try:
        return ConversationTokenizer.from_pretrained(name)
    except ConvcliError as exc:
        hint = (
            "; DialoGPT uses GPT-2's vocabulary: pass `tokenizer`: a folder holding its "
            "vocab.json and merges.txt to work offline"
            if str(name) == DEFAULT_TOKENIZER
            else ""
        )
        raise ConvcliError(f"{exc}{hint}") from exc


def _recorded_tokenizer(ckpt: Checkpoint, path: Path, notes: list[str]) -> ConversationTokenizer:
    """The tokenizer a train checkpoint holds or names, else GPT-2's (DialoGPT records none).

    `convcli train` keeps the tokenizer's files inside every checkpoint, so a run's
    checkpoint converts even after its shards have moved.
    """
    if ckpt.kind != "lightning":
        return _tokenizer(DEFAULT_TOKENIZER)
    if ckpt.tokenizer_files:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="convcli-tokenizer-") as tmp:
            for name, data in ckpt.tokenizer_files.items():
                (Path(tmp) / name).write_bytes(data)
            try:
                return _tokenizer(tmp)
            except ConvcliError as exc:  # name the checkpoint, not our temporary folder
                raise ConvcliError(
                    str(exc).replace(tmp, f"the tokenizer kept in {path}"), param=exc.params
                ) from None
    named = hparam(ckpt.hparams, "tokenizer", "tokenizer_path", "tokenizer_name_or_path")
    if isinstance(named, (str, Path)):
        return _tokenizer(named)
    shards = hparam(ckpt.hparams, "shards", "data")
    if isinstance(shards, (str, Path)) and (Path(shards) / "tokenizer").is_dir():
        return _tokenizer(Path(shards) / "tokenizer")
    base = hparam(ckpt.hparams, "model_name_or_path", "base_model", "model")
    if isinstance(base, (str, Path)):
        notes.append(f"used the tokenizer of the base model {base}")
        return _tokenizer(base)
    what = (
        "a `convcli train` checkpoint from before tokenizers were kept in checkpoints, "
        "and its shards are gone"
        if ckpt.from_convcli
        else "not a `convcli train` checkpoint and its hyper_parameters do not name its tokenizer"
    )
    raise ConvcliError(f"{path}: {what}; pass `tokenizer`", param="tokenizer")


def _recorded_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """The ModelMeta fields a `convcli train` checkpoint records (token types, reverse, sep)."""
    meta = ckpt.hparams.get("meta") if ckpt.kind == "lightning" else None
    return meta if isinstance(meta, dict) else {}


def _recorded_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The model config a train checkpoint records (a dict, or its base model's config.json)."""
    config = hparam(ckpt.hparams, "model_config", "config")
    if isinstance(config, dict):
        return config
    base = hparam(ckpt.hparams, "model_name_or_path", "base_model", "model")
    if isinstance(base, (str, Path)) and (Path(base) / "config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    return {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
