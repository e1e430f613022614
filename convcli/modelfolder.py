"""Model folders: plain Hugging Face folders plus a small `convcli.json`.

Everything convcli writes loads with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`. What plain transformers cannot know (whether the
model was trained with token types, which id separates turns, whether it is a
reverse model for MMI) lives in `convcli.json`. Every command that loads a model
goes through `load_model_folder`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli import __version__
from convcli.errors import ConvcliError, first_line
from convcli.loadgate import (
    TRUST,
    check_model_config,
    check_name,
    check_no_code,
    model_folder,
)
from convcli.outputs import write_atomically

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from convcli.tokenizer import ConversationTokenizer

META_FILE = "convcli.json"
META_FORMAT = "convcli-model"
META_VERSION = 1


@dataclass
class ModelMeta:
    """What convcli needs to know about a model folder beyond the Hugging Face files."""

    token_types: bool
    """Feed `token_type_ids` to the model (it was trained with them). GPT-2 embeds
    token types through `wte`, so a model trained without them must not get them."""
    sep_token_id: int
    """The id that separates (and ends) turns."""
    reverse: bool = False
    """A reverse model (predicts the source given the response), for MMI reranking."""
    made_by: str = "unknown"
    """The command that wrote the folder: train, convert, or unknown for foreign folders."""
    source: str = ""
    """What it was made from: a base model, a checkpoint file, a preset."""
    tokenizer_fingerprint: str = ""
    """`ConversationTokenizer.fingerprint()` of the saved tokenizer."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth recording (training steps, conversion report)."""
    convcli_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(
            {"format": META_FORMAT, "version": META_VERSION, **asdict(self)}, indent=2
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelMeta:
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise ConvcliError(f"{path}: unreadable convcli metadata: {exc}") from exc
        if data.get("format") != META_FORMAT:
            raise ConvcliError(
                f"{path}: not convcli model metadata (format {data.get('format')!r})"
            )
        if data.get("version", 0) > META_VERSION:
            raise ConvcliError(
                f"{path}: metadata version {data['version']} is newer than this convcli "
                f"understands ({META_VERSION}); upgrade convcli"
            )
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        """The fields of `data` this version knows (`format` and `version` aside)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LoadedModel:
    """A model ready for inference or training, with its tokenizer and metadata."""

    model: PreTrainedModel | None
    """None when loaded with `weights=False`."""
    tokenizer: ConversationTokenizer
    meta: ModelMeta
    path: str
    notes: list[str] = field(default_factory=list)
    """What the user should know about what was loaded (a run directory's final/ used)."""
    config: Any = None
    """The model's `PretrainedConfig`."""


@contextlib.contextmanager
def quiet_weight_bars() -> Iterator[None]:
    """Hide transformers' per-shard "Loading/Writing weights" bars: our commands report
    their own progress, and a tiny model's folder should not draw three bars."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def resolve_device(device: str | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when present, else CPU; others are checked first."""
    import torch

    from convcli.loadgate import check_device

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return torch.device(device)


def read_meta(name_or_path: str | Path, tokenizer: ConversationTokenizer) -> ModelMeta:
    """The folder's convcli metadata, or what a foreign GPT-2 folder implies.

    A folder convcli did not write (a hub GPT-2, a DialoGPT release) was trained
    without token types and separates turns with the tokenizer's sep (its eos).
    """
    path = Path(name_or_path)
    local = path / META_FILE
    if local.is_file():
        return ModelMeta.from_file(local)
    if not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            return ModelMeta.from_file(Path(hf_hub_download(str(name_or_path), META_FILE)))
        except Exception:  # no metadata on the hub, or offline: a foreign model
            pass
    return ModelMeta(
        token_types=False,
        sep_token_id=tokenizer.sep_token_id,
        source=str(name_or_path),
        tokenizer_fingerprint=tokenizer.fingerprint(),
    )


def checked_folder(name_or_path: str | Path) -> tuple[str, list[str]]:
    """What `name_or_path` stands for (a run directory's final/, see `model_folder`) and
    notes for the user, once it passed the checks made before anything is built: no
    code to run, a supported architecture whose sizes match its weights."""
    resolved, notes = model_folder(name_or_path)
    check_name(resolved)
    path = Path(resolved)
    if path.is_file():
        raise ConvcliError(
            f"{name_or_path} is a file, not a model folder"
            + (
                " (use `convcli convert` on checkpoints)"
                if path.suffix in (".pkl", ".ckpt", ".pt")
                else ""
            )
        )
    if path.is_dir():
        check_no_code(path)
        check_model_config(path)
    else:
        check_hub_config(resolved)
    return resolved, notes


def load_model_folder(
    name_or_path: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    share_tokenizer: tuple[str | Path, ConversationTokenizer] | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load a model folder (or hub name) with its tokenizer and metadata, in eval mode.

    `share_tokenizer=(folder, tokenizer)`: when this folder's tokenizer files are
    byte-identical to `folder`'s, use `tokenizer` (already loaded from there) instead of
    loading the same files again (MMI's forward and reverse models usually share one).
    `weights=False`: only the config is read, not the weights (another engine runs
    them), and `model` is None; everything else is checked as usual.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from convcli.tokenizer import ConversationTokenizer

    target = resolve_device(device)  # a device this machine lacks: one line, before loading
    name_or_path, notes = checked_folder(name_or_path)
    path = Path(name_or_path)
    if share_tokenizer is not None and same_tokenizer_files(Path(share_tokenizer[0]), path):
        tokenizer = share_tokenizer[1]
    else:
        tokenizer = ConversationTokenizer.from_pretrained(name_or_path)
    meta = read_meta(name_or_path, tokenizer)
    try:
        model = None
        if weights:
            with quiet_weight_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    str(name_or_path), dtype=dtype or "auto", **TRUST
                )
            config = model.config
        else:  # no model class either: importing it costs seconds of start-up
            config = AutoConfig.from_pretrained(str(name_or_path), **TRUST)
    except (OSError, ValueError) as exc:
        raise ConvcliError(f"cannot load model {str(name_or_path)!r}: {first_line(exc)}") from exc
    rows = model.get_input_embeddings().weight.shape[0] if model else config.vocab_size
    if len(tokenizer) > rows:
        raise ConvcliError(
            f"{name_or_path}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{rows} embeddings; they do not belong together"
        )
    if model is not None:
        model.to(target).eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, meta=meta, path=str(name_or_path), notes=notes,
        config=config,
    )  # fmt: skip


# Files of a model folder that hold the model, not its tokenizer. Everything else in the
# folder (tokenizer.json, vocab files, tokenizer_config.json, chat templates, files we do
# not know) counts as tokenizer input, so an unknown difference means "load it again".
_MODEL_FILES = frozenset({"config.json", "generation_config.json", META_FILE})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MAX_COMPARED_BYTES = 256 * 2**20


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """Whether two local model folders load the same tokenizer: the same tokenizer files
    (all but weights and model configs), byte for byte, and the same `model_type` /
    `tokenizer_class` in config.json (transformers falls back to them)."""
    if not (a.is_dir() and b.is_dir()):
        return False
    if a.resolve() == b.resolve():
        return True

    def listing(folder: Path) -> dict[str, Path]:
        return {
            str(p.relative_to(folder)): p
            for p in folder.rglob("*")
            if p.is_file()
            and p.name not in _MODEL_FILES
            and not p.name.endswith(_WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json")
        }

    files_a, files_b = listing(a), listing(b)
    if files_a.keys() != files_b.keys():
        return False
    sizes = [(files_a[n].stat().st_size, files_b[n].stat().st_size) for n in files_a]
    if any(x != y for x, y in sizes) or sum(x for x, _ in sizes) > _MAX_COMPARED_BYTES:
        return False
    if any(files_a[n].read_bytes() != files_b[n].read_bytes() for n in files_a):
        return False

    def config_keys(folder: Path) -> tuple[Any, Any] | None:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        return config.get("model_type"), config.get("tokenizer_class")

    keys = config_keys(a)
    return keys is not None and keys == config_keys(b)


def check_hub_config(name: str) -> None:
    """A hub model's config.json, checked like a folder's before its weights download."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(name, "config.json"))
    except Exception as exc:  # hub errors are many; all mean "cannot use it"
        raise ConvcliError(f"cannot load model {name!r}: {first_line(exc)}") from None
    check_no_code(path.parent)
    check_model_config(path.parent)


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: ConversationTokenizer,
    meta: ModelMeta,
    output: str | Path,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a complete model folder atomically: all of it, or nothing.

    The generation config ends generation at the sep token and pads with the
    tokenizer's pad id. `extra_files` maps file names to text (e.g. the resolved
    configuration) to write beside the weights.
    """

    def write(tmp: Path) -> None:
        gen = model.generation_config
        gen.eos_token_id = tokenizer.sep_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        gen.bos_token_id = tokenizer.sep_token_id
        model.config.eos_token_id = model.config.bos_token_id = tokenizer.sep_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        with quiet_weight_bars():
            model.save_pretrained(str(tmp))
        write_tokenizer_and_meta(tmp, tokenizer, meta, extra_files)

    return write_atomically(output, write, overwrite=overwrite)


def write_tokenizer_and_meta(
    tmp: Path,
    tokenizer: ConversationTokenizer,
    meta: ModelMeta,
    extra_files: dict[str, str] | None,
) -> None:
    tokenizer.save_pretrained(tmp)
    meta.sep_token_id = tokenizer.sep_token_id
    meta.tokenizer_fingerprint = tokenizer.fingerprint()
    (tmp / META_FILE).write_text(meta.to_json() + "\n", encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
