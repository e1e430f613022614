"""The gate every model, tokenizer and config load passes through before transformers.

Nothing loaded from disk runs code: transformers is always called with
`trust_remote_code=False`, and a folder that ships code (`*.py`, an `auto_map` in its
config) is refused before transformers sees it, so no prompt ("Do you wish to run the
custom code? [y/N]") ever reads a user's stdin. Only architectures convcli runs are
built, and a config's sizes must match the weights' shapes (read from the safetensors
header, no tensor loaded) before any memory is allocated for them.

It also turns what a newcomer gives by mistake into one line: a run directory (its
`final/` is used, saying so), a folder without tokenizer files, a mistyped name while the
hub cannot be reached (a couple of seconds, not a minute of retries), a device this torch
build cannot use.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from convcli.errors import ConvcliError, UsageError

SUPPORTED_MODEL_TYPES = ("gpt2",)
"""What convcli builds: GPT-2 and the models that share its architecture (DialoGPT)."""

TRUST = {"trust_remote_code": False}
"""Passed to every transformers `from_pretrained`: code shipped with a model never runs."""

CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
TOKENIZER_FILES = (
    ("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("tokenizer.model",),
    ("spiece.model",), ("sentencepiece.bpe.model",),
)  # fmt: skip
"""A tokenizer folder needs one of these sets of files (fast, BPE, WordPiece, SentencePiece)."""

HUB_TIMEOUT_S = 2.0


# -- names and folders -------------------------------------------------------------------------


def model_folder(name_or_path: str | Path) -> tuple[str, list[str]]:
    """The folder (or hub name) to load for `name_or_path`, and notes for the user.

    A training run directory stands for its `final/` model (its `best/` is named in the
    note); one without `final/` yet is refused with where to look.
    """
    path = Path(name_or_path)
    if not path.is_dir() or (path / "config.json").is_file():
        return str(name_or_path), []
    final, best = path / "final", path / "best"
    looks_like_run = (path / "train.yaml").is_file() or (path / "checkpoints").is_dir()
    if (final / "config.json").is_file():
        also = f"; {best} holds the best by validation loss" if best.is_dir() else ""
        return str(final), [f"{path} is a training run: using its final model {final}{also}"]
    if looks_like_run:
        raise ConvcliError(
            f"{path} is a training run without a final model yet; use {best} if it exists, "
            f"or `convcli convert` one of {path / 'checkpoints'}/*.ckpt into a folder"
        )
    return str(name_or_path), []


def check_name(name_or_path: str | Path, what: str = "model") -> None:
    """A name that is not a local path must be reachable on the hub, said within seconds."""
    path = Path(name_or_path)
    if path.exists():
        return
    if not _looks_like_hub_id(str(name_or_path)):
        raise ConvcliError(f"{what} folder not found: {name_or_path}")
    if not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub is unreachable"
        raise ConvcliError(
            f"{what} {name_or_path!r}: not a folder here, and {why}; give a local folder"
        )


def _looks_like_hub_id(name: str) -> bool:
    """`gpt2` or `org/name`; anything else that does not exist is a missing folder, and so
    is `runs/mdl` when a local `runs/` exists (a typo, not a hub organisation)."""
    import re

    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is None or name.startswith("."):
        return False
    parent = Path(name).parent
    return parent == Path(".") or not parent.is_dir()


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub answers a TCP connection within `timeout` seconds (name lookup
    included, which has no timeout of its own: it runs in a thread we stop waiting for)."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key in _reachable:
        return _reachable[key]
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    _reachable[key] = bool(result and result[0])
    return _reachable[key]


# -- what a folder may hold --------------------------------------------------------------------


def check_no_code(folder: Path) -> None:
    """Refuse a folder that ships code for transformers to run (files or an auto_map)."""
    code = sorted(p.name for p in folder.glob("*.py"))
    mapped = [name for name in CONFIG_FILES if "auto_map" in (_read_json(folder / name) or {})]
    if code or mapped:
        what = ", ".join(
            [*code[:3], *(f"auto_map in {name}" for name in mapped)]
            + ([f"{len(code) - 3} more .py files"] if len(code) > 3 else [])
        )
        raise ConvcliError(
            f"{folder} ships custom code ({what}); convcli never runs code from a model or "
            "tokenizer folder: use a folder without it"
        )


def check_tokenizer_files(folder: Path) -> None:
    """A local tokenizer folder must hold the files of a GPT-2-style tokenizer."""
    if any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
        return
    meta = _read_json(folder / "convcli.json") or {}
    source = meta.get("source")
    hint = f" (it was made from {source}: copy its tokenizer files)" if source else ""
    raise ConvcliError(
        f"{folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt){hint}"
    )


def check_model_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked: a supported architecture whose sizes match its
    weights. Read as plain JSON: nothing is built or allocated until this passes."""
    config_path = folder / "config.json"
    config = _read_json(config_path)
    if config is None:
        missing = not config_path.is_file()
        raise ConvcliError(
            f"{folder}: {'no config.json' if missing else 'config.json is not a JSON object'}"
            " (not a model folder)"
        )
    check_model_type(config, str(config_path))
    check_shapes(folder, config)
    return config


def check_model_type(config: dict[str, Any], where: str) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvcliError(
            f"{where}: model_type {model_type!r} is not an architecture convcli runs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}: GPT-2 and DialoGPT models)"
        )


def check_shapes(folder: Path, config: dict[str, Any]) -> None:
    """The config's vocab/width/positions/layers/MLP width must be those of the weights (safetensors
    or zip-format .bin).

    A config that claims a far larger model than its weights would be built (and its memory
    allocated) before transformers notices; this reads only the files' headers (indexes).
    """
    shapes = safetensors_shapes(folder) or bin_shapes(folder)
    if not shapes:
        return  # an old-format .bin: transformers checks shapes as it loads
    names = {k.removeprefix("transformer."): v for k, v in shapes.items()}
    wte, wpe = names.get("wte.weight"), names.get("wpe.weight")
    layers = {
        int(k.split(".")[1]) for k in names if k.startswith("h.") and k.split(".")[1].isdigit()
    }
    found = {
        "vocab_size": wte[0] if wte else None,
        "n_embd": wte[1] if wte else None,
        "n_positions": wpe[0] if wpe else None,
        "n_layer": max(layers) + 1 if layers else None,
        "n_inner": fc[1] if (fc := names.get("h.0.mlp.c_fc.weight")) else None,  # Conv1D
    }
    claimed = dict(config)
    if claimed.get("n_inner") is None and isinstance(claimed.get("n_embd"), int):
        claimed["n_inner"] = 4 * claimed["n_embd"]  # GPT-2's default width of its MLP
    differ = [
        f"{key} {claimed.get(key)} vs {value}"
        for key, value in found.items()
        if value is not None and claimed.get(key) is not None and claimed.get(key) != value
    ]
    if differ:
        raise ConvcliError(
            f"{folder}: config.json does not match the weights ({', '.join(differ)} in the "
            "weights); refusing to build it"
        )


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every safetensors file of the folder, from their headers."""
    files = sorted(folder.glob("*.safetensors"))
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            with open(file, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > 100 * 2**20:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise ConvcliError(f"{file}: not a safetensors file ({exc})") from None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                shapes[name] = list(entry.get("shape") or [])
    return shapes


def bin_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape in the folder's `pytorch_model*.bin` files of the zip format,
    memory-mapped (tensors only, nothing read but the index). Old-format files: none."""
    import torch

    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("pytorch_model*.bin")):
        with open(file, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                continue
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # unreadable: transformers says why when it loads the folder
            continue
        if isinstance(state, dict):
            shapes.update({k: list(v.shape) for k, v in state.items() if torch.is_tensor(v)})
    return shapes


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- devices -----------------------------------------------------------------------------------


def check_device(device: str | None) -> None:
    """Refuse a device this torch build or machine cannot use, in one line (exit 2)."""
    if device in (None, "auto"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(
            f"`device` {device}: not a device name; {usable_devices()}", param="device"
        ) from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"`device` {device}: no CUDA here; {usable_devices()}",
                             param="device")  # fmt: skip
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(
                f"`device` {device}: this machine has {count} CUDA device(s); {usable_devices()}",
                param="device",
            )
        return
    if parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"`device` {device}: MPS is not available; {usable_devices()}",
                             param="device")  # fmt: skip
        return
    raise UsageError(f"`device` {device}: not supported; {usable_devices()}", param="device")


def usable_devices() -> str:
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names += ["cuda"] + [f"cuda:{i}" for i in range(count)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return f"this torch build can use: {', '.join(names)}"
