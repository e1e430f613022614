"""Checkpoint files of a run: written atomically in the run directory, verified on resume.

Lightning's own save serialises into memory and writes through an fsspec transaction
whose temporary file lives in $TMPDIR, so with the run on another filesystem the final
write is a copy that a kill truncates. Here torch.save writes a hidden temporary file
beside the checkpoint, which is fsynced and renamed: a `step-N.ckpt` is whole or absent.
`--resume auto` takes the newest checkpoint that reads back, saying which it skipped.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from convcli.errors import ConvcliError
from convcli.outputs import replaced_in_one_step

TEMP_PREFIX = ".ckpt-tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose files appear complete or not at all."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        import torch

        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        with replaced_in_one_step(path, prefix=f"{TEMP_PREFIX}{path.name}-") as handle:
            torch.save(checkpoint, handle)


def clean_temporaries(directory: Path) -> list[str]:
    """Remove the temporary files killed saves left (call it holding the run's lock)."""
    removed = []
    for leftover in sorted(directory.glob(f"{TEMP_PREFIX}*")):
        with contextlib.suppress(OSError):
            leftover.unlink()
            removed.append(leftover.name)
    return removed


def readable_checkpoint(path: Path) -> str | None:
    """None when `path` reads back as a Lightning checkpoint, else why not (one line)."""
    from convcli.conversion.checkpoint import load_weights_only

    try:
        loaded = load_weights_only(path)
    except ConvcliError as exc:
        return str(exc)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        return f"{path}: not a Lightning checkpoint"
    return None


def newest_readable(found: list[tuple[int, Path]]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of `found` (oldest first) that reads back, and a warning
    naming each newer one skipped (a save killed by an older convcli, a damaged disk)."""
    skipped = []
    for _, path in reversed(found):
        problem = readable_checkpoint(path)
        if problem is None:
            return path, [
                f"warning: skipped {name} ({why}); resuming from {path.name}"
                for name, why in skipped
            ]
        why = problem.removeprefix(f"{path}: ").split(" (")[0]  # torch's detail runs long
        skipped.append((path.name, why))
    return None, [f"{name}: {why}" for name, why in skipped]
