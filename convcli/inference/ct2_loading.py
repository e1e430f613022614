"""Loading a model folder for the ctranslate2 backend: once the folder is converted, in
a fraction of a second, without importing torch or transformers.

Importing torch (which transformers imports) takes about two seconds on a small CPU:
longer than an int8 MMI turn of GPT-2 small. So the first load of a folder goes through
transformers (tokenizer, config, metadata, the checks of `load_model_folder`) and the
conversion, and the conversion keeps a snapshot of what was loaded beside it
(`SNAPSHOT_FILE`): the tokenizer's `tokenizers` backend and special tokens, the folder's
metadata, its config and its generation defaults. A conversion's cache key covers every
file of the folder, so a later load that finds the conversion finds the snapshot of the
same files; it runs the checks that read no weights again and rebuilds the rest from the
snapshot (`BackendTokenizer` encodes and decodes as the tokenizer it was taken from).
A tokenizer a snapshot cannot hold (a slow one) is loaded through transformers each time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from convcli.errors import ConvcliError
from convcli.inference.ct2_engine import SNAPSHOT_FILE, CT2Engine, engine_device, find_conversion
from convcli.modelfolder import (
    META_FILE,
    LoadedModel,
    ModelMeta,
    checked_folder,
    load_model_folder,
    same_tokenizer_files,
)
from convcli.tokenizer import BackendTokenizer, ConversationTokenizer

# What a folder's generation_config.json may set that the ctranslate2 backend applies
# itself (transformers' generate applies the folder's defaults on the torch backend).
ENGINE_DEFAULTS = ("do_sample", "top_k", "top_p", "temperature", "num_beams",
                   "repetition_penalty", "no_repeat_ngram_size", "early_stopping")  # fmt: skip
SNAPSHOT_VERSION = 1


def load_for_engine(
    path: str | Path,
    *,
    device: str | None,
    compute_type: str,
    threads: int,
    share_tokenizer: tuple[str, ConversationTokenizer] | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[LoadedModel, CT2Engine, dict[str, Any]]:
    """The folder's tokenizer, metadata and config (`LoadedModel` without a model), its
    engine, and its generation defaults. `share_tokenizer=(folder, tokenizer)` as in
    `load_model_folder`."""
    target = engine_device(device)  # before anything loads: one line
    resolved, notes = checked_folder(path)
    folder = Path(resolved)
    if not folder.is_dir():
        raise ConvcliError(f"{path}: the ctranslate2 backend needs a local model folder")
    meta_file = folder / META_FILE
    token_types = meta_file.is_file() and ModelMeta.from_file(meta_file).token_types
    found = find_conversion(folder, compute_type, 0 if token_types else None)
    snapshot = read_snapshot(found / SNAPSHOT_FILE) if found is not None else None
    if snapshot is not None:
        loaded = from_snapshot(snapshot, folder, notes, share_tokenizer)
        defaults = dict(snapshot["generation_defaults"])
    else:  # first load of these files: through transformers, and the snapshot made
        loaded = load_model_folder(folder, device="cpu", weights=False,
                                   share_tokenizer=share_tokenizer)  # fmt: skip
        loaded.notes = notes
        defaults = generation_defaults(folder)
        snapshot = snapshot_of(loaded, defaults)
    engine = CT2Engine(
        folder, device=target, compute_type=compute_type, sep_token_id=loaded.meta.sep_token_id,
        threads=threads, token_types=loaded.meta.token_types, report=report, snapshot=snapshot,
    )  # fmt: skip
    return loaded, engine, defaults


def generation_defaults(folder: Path) -> dict[str, Any]:
    """The decoding options the folder's generation_config.json sets (transformers reads
    it, as the torch backend's `generate` would)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(folder)).to_diff_dict()
    except (OSError, ValueError):
        config = {}
    return {k: config[k] for k in ENGINE_DEFAULTS if k in config}


def snapshot_of(loaded: LoadedModel, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """What `from_snapshot` rebuilds `loaded` from (None: its tokenizer cannot be kept)."""
    tokenizer = BackendTokenizer.snapshot(loaded.tokenizer.tokenizer)
    if tokenizer is None:
        return None
    return {
        "version": SNAPSHOT_VERSION,
        "tokenizer": tokenizer,
        "meta": json.loads(loaded.meta.to_json()),
        "config": json.loads(loaded.config.to_json_string(use_diff=False)),
        "generation_defaults": defaults,
    }


def read_snapshot(file: Path) -> dict[str, Any] | None:
    """A snapshot this version reads, or None (then the folder loads the slow way)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("version") == SNAPSHOT_VERSION
    return data if ok else None


def from_snapshot(
    snapshot: dict[str, Any],
    folder: Path,
    notes: list[str],
    share_tokenizer: tuple[str, ConversationTokenizer] | None,
) -> LoadedModel:
    """The `LoadedModel` (without a model) that `snapshot` was taken from."""
    if share_tokenizer is not None and same_tokenizer_files(Path(share_tokenizer[0]), folder):
        tokenizer = share_tokenizer[1]
    else:
        tokenizer = ConversationTokenizer(BackendTokenizer(**snapshot["tokenizer"]))
    return LoadedModel(
        model=None, tokenizer=tokenizer, meta=ModelMeta.from_dict(snapshot["meta"]),
        path=str(folder), notes=notes, config=SimpleNamespace(**snapshot["config"]),
    )  # fmt: skip
