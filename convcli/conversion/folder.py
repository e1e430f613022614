"""Writing a converted state dict as a model folder, casting each tensor on its way out.

The folder is what `save_model_folder` (transformers' `save_pretrained`) writes, without
importing or building a model. The weights go into model.safetensors in one pass: each
tensor is cast through a small reused buffer straight into the file, so a float32
folder from a float16 checkpoint never holds a float32 copy of the model in memory
(on these machines every fresh GB of memory costs about as much as writing it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from convcli.modelfolder import ModelMeta, write_tokenizer_and_meta
from convcli.outputs import start_writeback

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from convcli.tokenizer import ConversationTokenizer

WEIGHTS_FILE = "model.safetensors"
_CHUNK = 1 << 22  # elements cast per write: 16 MB of float32
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_folder(
    folder: Path,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    config: PretrainedConfig,
    tokenizer: ConversationTokenizer,
    meta: ModelMeta,
    *,
    extra_files: dict[str, str] | None = None,
    written: Callable[[torch.Tensor, int, int], None] | None = None,
) -> None:
    """Fill `folder` (a `write_atomically` temporary): config.json naming the architecture
    and dtype, generation_config.json, model.safetensors with `weights` cast to `dtype`,
    the tokenizer and convcli's metadata.

    `weights` is emptied as it is written (each tensor is released once in the file); a
    tied output layer must be left out of it, as transformers does. `written(tensor,
    done, total)` is called after each tensor.
    """
    from transformers import GenerationConfig

    config.architectures = [f"{type(config).__name__.removesuffix('Config')}LMHeadModel"]
    config.dtype = dtype
    config.eos_token_id = config.bos_token_id = tokenizer.sep_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(str(folder))
    gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id = gen.bos_token_id = tokenizer.sep_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(folder))
    write_safetensors(folder / WEIGHTS_FILE, weights, dtype, {"format": "pt"}, written=written)
    start_writeback(folder / WEIGHTS_FILE)  # to the disk while the rest is written and verified
    write_tokenizer_and_meta(folder, tokenizer, meta, extra_files)


def write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    metadata: dict[str, str],
    *,
    written: Callable[[torch.Tensor, int, int], None] | None = None,
) -> None:
    """The safetensors format, streamed: an 8-byte little-endian header length, the JSON
    header (name -> dtype, shape, byte range; padded to 8 bytes), then the bytes of each
    tensor in header order. `tensors` is emptied as they are written."""
    import sys

    import torch

    if sys.byteorder != "little":  # safetensors is little-endian; torch's memory is native
        raise NotImplementedError("writing safetensors needs a little-endian machine")
    code = _CODES[str(dtype).removeprefix("torch.")]
    names = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = largest = 0
    for name in names:
        largest = max(largest, tensors[name].numel())
        size = tensors[name].numel() * dtype.itemsize
        shape = list(tensors[name].shape)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    buffer: torch.Tensor | None = None
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for done, name in enumerate(names, 1):
            tensor = tensors.pop(name)
            flat = tensor.reshape(-1)  # a view when contiguous, else one copy of this tensor
            if flat.dtype == dtype:
                f.write(flat.view(torch.uint8).numpy())
            else:
                if buffer is None:  # allocated once: fresh memory is what costs here
                    buffer = torch.empty(min(_CHUNK, largest), dtype=dtype)
                for start in range(0, flat.numel(), _CHUNK):
                    piece = flat[start : start + _CHUNK]
                    out = buffer[: piece.numel()]
                    out.copy_(piece)
                    f.write(out.view(torch.uint8).numpy())
            if written:
                written(tensor, done, len(names))
            del tensor, flat
