"""Reading checkpoint files safely: tensors and plain containers only, never code.

`torch.load(weights_only=True)` refuses any pickle that asks to call something other
than torch's tensor rebuilders, so a malicious `__reduce__` never runs. What is left
here is telling the user, in one line, what is wrong with a file that will not load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.errors import ConvcliError

if TYPE_CHECKING:
    import torch

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 (and Lightning .ckpt files)
PICKLE_PROTO = b"\x80"  # the legacy torch.save format starts with a protocol-2 pickle

# Lightning checkpoints may keep paths in their hyper-parameters; rebuilding a path
# runs no code of the file's choosing, so these are allowed besides tensors.
_SAFE_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")


@dataclass
class Checkpoint:
    """The tensors of a checkpoint file and what we know about where they came from."""

    state: dict[str, torch.Tensor]
    """The model's tensors, keys as found in the file."""
    kind: str
    """`dialogpt` for a bare state dict (.pkl), `lightning` for a convcli train .ckpt."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """A Lightning checkpoint's `hyper_parameters` (empty for a bare state dict)."""
    ignored: list[str] = field(default_factory=list)
    """State-dict keys outside the model (Lightning keys not under `model.`)."""
    step: int | None = None
    """A Lightning checkpoint's global step."""
    mapped: bool = False
    """The tensors are memory-mapped views of the file (zip format)."""
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    """The tokenizer's files, by name, as `convcli train` keeps them in its checkpoints."""
    from_convcli: bool = False
    """Written by `convcli train` (its `hyper_parameters` hold settings, config and meta)."""


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a DialoGPT `.pkl` or a Lightning `.ckpt`: tensors only, memory-mapped if possible."""
    raw = load_weights_only(path)
    mapped = is_zip(path)
    if not isinstance(raw, dict):
        raise ConvcliError(
            f"{path}: holds a {type(raw).__name__}, not a state dict (names mapped to tensors)"
        )
    if isinstance(raw.get("state_dict"), dict):
        ckpt = _lightning(path, raw)
    else:
        ckpt = Checkpoint(state=_tensors_only(path, raw), kind="dialogpt")
    ckpt.mapped = mapped
    return ckpt


def is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ZIP_MAGIC


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident file pages of a memory-mapped tensor we are done with.

    Its pages stay in this process's RSS until the whole file is unmapped; converting
    fp16 to fp32 would otherwise hold the file and its float32 copy at once. Only
    whole pages inside the tensor are dropped, and only on Linux. The mapping is
    private and never written, so a later read would just fetch them from the file again.
    """
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last - first >= page:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def load_weights_only(path: Path) -> Any:
    """`torch.load` with `weights_only=True`, its failures turned into one clear line."""
    import pathlib

    import torch

    if not path.exists():
        raise ConvcliError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ConvcliError(f"{path} is a directory, not a checkpoint file")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ConvcliError(f"{path}: empty file, not a checkpoint")
    is_zip = head == ZIP_MAGIC
    if not is_zip and not head.startswith(PICKLE_PROTO):
        raise ConvcliError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
        )
    safe = [getattr(pathlib, name) for name in _SAFE_PATH_CLASSES if hasattr(pathlib, name)]
    try:
        with torch.serialization.safe_globals(safe):
            # mmap only works for the zip format; the released DialoGPT files are older.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # torch raises many types here; all mean "unreadable"
        raise ConvcliError(f"{path}: {_explain(exc)}") from exc


def _explain(exc: Exception) -> str:
    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return (
            f"refused: the pickle asks to run {blocked.group(1)}, which is not tensor data "
            "(a malicious file or a pickled Python object); nothing in it was executed"
        )
    if isinstance(exc, EOFError):
        return "truncated or corrupt checkpoint (the data ends early)"
    reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if reason:
        return f"not a torch.save checkpoint ({reason.group(1).strip()})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if "magic number" in first.lower():
        return "a pickle, but not one written by torch.save"
    if "eof" in first.lower() or "corrupt" in first.lower():
        return f"truncated or corrupt checkpoint ({first})"
    return f"not a readable PyTorch checkpoint ({first})"


def _tensors_only(path: Path, state: dict[Any, Any]) -> dict[str, torch.Tensor]:
    import torch

    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        sample = ", ".join(repr(k) for k in bad[:3])
        raise ConvcliError(
            f"{path}: a pickle that is not a state dict ({len(bad)} of {len(state)} entries are "
            f"not named tensors, e.g. {sample})"
        )
    if not state:
        raise ConvcliError(f"{path}: an empty dict, not a state dict")
    return state


def _lightning(path: Path, raw: dict[str, Any]) -> Checkpoint:
    """The HF model of a convcli train checkpoint lives under `model.` (`self.model`)."""
    state = _tensors_only(path, raw["state_dict"])
    inside = {k: v for k, v in state.items() if k.startswith("model.")}
    ignored = [k for k in state if not k.startswith("model.")]
    hparams = raw.get("hyper_parameters")
    hparams = dict(hparams) if isinstance(hparams, dict) else {}
    ours = all(isinstance(hparams.get(k), dict) for k in ("settings", "config", "meta"))
    if not inside:
        raise ConvcliError(
            f"{path}: a Lightning checkpoint, but not one of `convcli train`: its state_dict "
            f"has no `model.` weights (it holds {_first(sorted(state))}); convert reads a "
            "GPT-2 kept as the LightningModule's `self.model`"
        )
    extra = raw.get("convcli") if isinstance(raw.get("convcli"), dict) else {}
    files = extra.get("tokenizer") if isinstance(extra.get("tokenizer"), dict) else {}
    step = raw.get("global_step")
    return Checkpoint(
        state=inside,
        kind="lightning",
        hparams=hparams,
        ignored=ignored,
        step=step if isinstance(step, int) else None,
        tokenizer_files={
            k: v for k, v in files.items() if isinstance(v, bytes) and _plain_file_name(k)
        },
        from_convcli=ours,
    )


def _plain_file_name(name: object) -> bool:
    """A bare file name: the tokenizer files are written into a folder by these names."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _first(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def hparam(hparams: dict[str, Any], *names: str) -> Any:
    """The first of `names` set in `hparams` or in one of its nested dicts."""
    scopes = [hparams, *(v for v in hparams.values() if isinstance(v, dict))]
    for scope in scopes:
        for name in names:
            if scope.get(name) is not None:
                return scope[name]
    return None
