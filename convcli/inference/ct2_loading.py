"""Loading a model folder for the ctranslate2 backend: once the folder is converted, in
a fraction of a second, without importing torch or transformers.

Importing torch (which transformers imports) takes about two seconds on a small CPU:
longer than an int8 MMI turn of GPT-2 small. So the first load of a folder goes through
transformers (tokenizer, config, metadata, the checks of `load_model_folder`) and the
conversion, and the conversion keeps a snapshot of what was loaded beside it
(`SNAPSHOT_FILE`): the tokenizer's `tokenizers` backend and special tokens, the folder's
metadata, its config and its generation defaults. A snapshot records the files it was
taken from (name, size, times, inode: the conversion's cache key) and the versions of
convcli, tokenizers and transformers; it is kept only when the files converted are those
files and read only while files and versions are unchanged. A later load runs the checks
that read no weights again and rebuilds the rest from the snapshot (`BackendTokenizer`
encodes and decodes as the tokenizer it was taken from). Otherwise (a slow tokenizer, a
snapshot this build cannot rebuild) the folder loads through transformers, as the first
time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from convcli.errors import ConvcliError
from convcli.inference.ct2_engine import (
    SNAPSHOT_FILE,
    CT2Engine,
    engine_device,
    find_conversion,
    identity,
)
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
    # The files as they are before anything is read: a snapshot is only ever taken from,
    # kept with and read for these very files.
    ident = identity(folder, compute_type, 0 if token_types else None)
    found = find_conversion(ident)
    snapshot = read_snapshot(found / SNAPSHOT_FILE, ident) if found is not None else None
    loaded = None
    if snapshot is not None:
        try:
            loaded = from_snapshot(snapshot, folder, notes, share_tokenizer)
            defaults = dict(snapshot["generation_defaults"])
        except Exception:  # a snapshot this build cannot rebuild: load the slow way
            loaded = None
    if loaded is None:  # first load of these files: through transformers, snapshot taken
        with _transformers_quiet():
            loaded = load_model_folder(folder, device="cpu", weights=False,
                                       share_tokenizer=share_tokenizer)  # fmt: skip
            loaded.notes = notes
            defaults = generation_defaults(folder)
            snapshot = snapshot_of(loaded, defaults, ident)
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


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' advice stays off the terminal while the folder loads through it (as
    `load_models` keeps it off on the torch backend)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def versions() -> dict[str, str]:
    """What a snapshot's contents depend on besides the folder's files."""
    import tokenizers

    from convcli import __version__

    return {"convcli": __version__, "tokenizers": tokenizers.__version__,
            "transformers": importlib.metadata.version("transformers")}  # fmt: skip


def snapshot_of(
    loaded: LoadedModel, defaults: dict[str, Any], ident: dict[str, Any]
) -> dict[str, Any] | None:
    """What `from_snapshot` rebuilds `loaded` from, for the files of `ident` (None: its
    tokenizer cannot be kept)."""
    tokenizer = BackendTokenizer.snapshot(loaded.tokenizer.tokenizer)
    if tokenizer is None:
        return None
    return {
        "version": SNAPSHOT_VERSION,
        "files": ident["files"],
        "versions": versions(),
        "tokenizer": tokenizer,
        "meta": json.loads(loaded.meta.to_json()),
        "config": json.loads(loaded.config.to_json_string(use_diff=False)),
        "generation_defaults": defaults,
    }


def read_snapshot(file: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The snapshot in `file` when it was taken from the files of `ident` by the library
    versions installed now, else None (then the folder loads the slow way)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
        return None
    if data.get("files") != ident["files"] or data.get("versions") != versions():
        return None
    return data


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
