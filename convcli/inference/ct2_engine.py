"""The optional CTranslate2 backend (`backend="ctranslate2"`): int8 decoding on CPU.

Decoding GPT-2 at batch 1 reads every weight once per token, so its speed is the
memory bandwidth divided by the weights' bytes: int8 weights are read four times
faster than float32 ones. PyTorch's own int8 path (`torch.ao` dynamic quantization) is
deprecated, and torchao's int8 layers run slower than float32 on CPU unless compiled;
CTranslate2 is an engine made for this: GPT-2 with int8 kernels, several sampled
hypotheses per input, and sequence scoring (MMI's reverse model).

The model folder is converted once and kept in the user's cache (see `cache_root`),
keyed by the folder's files, so later runs load the converted model directly. Token ids
pass through unchanged: the converted vocabulary names each id by its number.

What differs from the torch backend, plainly:
- int8 weights change the logits a little, so a greedy reply can part from the
  float32 one after some tokens; `compute_type="float32"` computes in float32 (the same
  numbers up to rounding, not bit for bit).
- sampling draws from CTranslate2's random generator: a seed reproduces a reply within
  this backend, not the torch backend's reply for the same seed.
- a model trained with token types cannot run here: CTranslate2's GPT-2 has no input
  for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.errors import ConvcliError, UsageError

if TYPE_CHECKING:
    from types import ModuleType

COMPUTE_TYPES = ("int8", "int8_float32", "float32", "int8_float16", "int8_bfloat16", "float16",
                 "bfloat16")  # fmt: skip
# Bump when the conversion below changes: older cached conversions are then ignored.
CONVERSION_VERSION = 1
# transformers `generate` options and what CTranslate2 calls them.
RENAMED = {
    "num_return_sequences": "num_hypotheses",
    "num_beams": "beam_size",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "top_k": "sampling_topk",
    "top_p": "sampling_topp",
    "temperature": "sampling_temperature",
}
# Options that only matter to transformers (handled here by other means).
IGNORED = {"pad_token_id", "use_cache"}


def require_ctranslate2() -> ModuleType:
    """The ctranslate2 module, or one line saying how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise ConvcliError(
            "the ctranslate2 backend needs the ctranslate2 package: "
            "pip install 'convcli[ctranslate2]'"
        ) from None
    return ctranslate2


def cache_root() -> Path:
    """Where converted models are kept: $CONVCLI_CACHE, else $XDG_CACHE_HOME/convcli (or
    ~/.cache/convcli), under ctranslate2/."""
    base = os.environ.get("CONVCLI_CACHE")
    if base:
        return Path(base) / "ctranslate2"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "convcli" / "ctranslate2"


def quantization_for(compute_type: str) -> str | None:
    """How the weights are stored for a compute type: as they are computed."""
    return None if compute_type == "float32" else compute_type


def cache_key(folder: Path, compute_type: str) -> str:
    """A name for the conversion of `folder`'s current files at `compute_type`."""
    ct2 = require_ctranslate2()
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns])
    identity = {
        "folder": str(folder.resolve()),
        "files": files,
        "storage": quantization_for(compute_type),
        "ctranslate2": ct2.__version__,
        "conversion": CONVERSION_VERSION,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{folder.resolve().name}-{digest[:16]}"


def convert(folder: Path, output: Path, compute_type: str, sep_token_id: int) -> None:
    """Write the GPT-2 in `folder` as a CTranslate2 model folder at `output`.

    CTranslate2's own GPT-2 loader maps the layers; the vocabulary is the ids' numbers,
    so no tokenizer is involved and ids round-trip exactly.
    """
    require_ctranslate2()
    import torch
    from ctranslate2.converters.transformers import GPT2Loader
    from transformers import AutoModelForCausalLM

    from convcli.loadgate import TRUST
    from convcli.modelfolder import quiet_weight_bars

    with quiet_weight_bars():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **TRUST)
    spec = GPT2Loader().get_model_spec(model)
    spec.register_vocabulary([str(i) for i in range(model.config.vocab_size)])
    spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = str(sep_token_id)
    spec.config.layer_norm_epsilon = model.config.layer_norm_epsilon
    spec.validate()
    spec.optimize(quantization=quantization_for(compute_type))
    spec.save(str(output))


def converted_folder(folder: Path, compute_type: str, sep_token_id: int) -> Path:
    """The cached conversion of `folder` (made now when missing).

    The conversion is written to a temporary folder beside its final name and renamed
    into place, so a crash leaves no half-written model and two processes converting
    at once both end with one whole copy.
    """
    from convcli.outputs import rename_noreplace

    root = cache_root()
    target = root / cache_key(folder, compute_type)
    if (target / "model.bin").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        convert(folder, tmp, compute_type, sep_token_id)
        if not rename_noreplace(tmp, target):  # another process was faster
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ct2_options(hf_kwargs: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """transformers `generate` options as CTranslate2 `generate_batch` options."""
    options: dict[str, Any] = {"max_length": max_new_tokens, "include_prompt_in_result": False}
    kwargs = dict(hf_kwargs)
    sample = bool(kwargs.pop("do_sample", False))
    min_new = kwargs.pop("min_new_tokens", None)
    if min_new is not None:
        options["min_length"] = min(int(min_new), max_new_tokens)
    for name in IGNORED:
        kwargs.pop(name, None)
    unknown = sorted(set(kwargs) - set(RENAMED))
    if unknown:
        raise UsageError(
            f"the ctranslate2 backend does not take the generation option `{unknown[0]}` "
            "(use the torch backend)"
        )
    for name, value in kwargs.items():
        if value is not None:
            options[RENAMED[name]] = value
    if sample:
        if options.get("beam_size", 1) > 1:
            raise UsageError("the ctranslate2 backend samples without beams: drop `num_beams`")
        # transformers' default for GPT-2; 0 means the whole vocabulary in both engines.
        options.setdefault("sampling_topk", 50)
    else:
        # Greedy or beam search: CTranslate2 samples only when top-k is not 1.
        for name in ("sampling_topk", "sampling_topp", "sampling_temperature"):
            options.pop(name, None)
        options["sampling_topk"] = 1
        if options.get("num_hypotheses", 1) > options.get("beam_size", 1):
            raise UsageError(
                "greedy decoding gives one reply: set `num_beams` to at least "
                "`num_return_sequences`, or sample"
            )
    return options


class CT2Engine:
    """A CTranslate2 generator for one converted model: generation and scoring by ids."""

    def __init__(self, folder: Path, device: str, compute_type: str, threads: int) -> None:
        if compute_type not in COMPUTE_TYPES:
            raise UsageError(
                f"`compute_type` must be one of {', '.join(COMPUTE_TYPES)}, got {compute_type!r}"
            )
        self.folder, self.compute_type, self.threads = folder, compute_type, threads
        kind, _, index = device.partition(":")
        self.device, self.device_index = kind, int(index or 0)
        self.generator = self._load()

    @classmethod
    def for_folder(
        cls, folder: str | Path, *, device: str, compute_type: str, sep_token_id: int,
        threads: int,
    ) -> CT2Engine:  # fmt: skip
        """The engine for the GPT-2 model folder `folder` (converted once, then cached)."""
        path = Path(folder)
        if not path.is_dir():
            raise ConvcliError(f"{folder}: the ctranslate2 backend needs a local model folder")
        if compute_type not in COMPUTE_TYPES:  # before any conversion
            raise UsageError(
                f"`compute_type` must be one of {', '.join(COMPUTE_TYPES)}, got {compute_type!r}",
                param="compute_type",
            )
        converted = converted_folder(path, compute_type, sep_token_id)
        return cls(converted, device, compute_type, threads)

    def _load(self) -> Any:
        ct2 = require_ctranslate2()
        return ct2.Generator(
            str(self.folder),
            device=self.device,
            device_index=self.device_index,
            compute_type=self.compute_type,
            intra_threads=self.threads,
            inter_threads=1,
        )

    def reseed(self, seed: int) -> None:
        """Make the next calls draw from `seed`.

        CTranslate2 seeds a worker thread's random generator when the thread starts, so
        a seed takes a fresh generator (loading a converted model takes a fraction of a
        second, from the page cache).
        """
        ct2 = require_ctranslate2()
        ct2.set_random_seed(int(seed) % 2**32)
        self.generator = self._load()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stops: Sequence[int],
        **hf_kwargs: Any,
    ) -> list[list[int]]:
        """The reply ids of every hypothesis of every prompt, prompt-major, each cut
        before its first stop id (`reseed` first for reproducible samples)."""
        options = ct2_options(hf_kwargs, max_new_tokens)
        results = self.generator.generate_batch(
            [[str(t) for t in ids] for ids in prompts], end_token=[int(s) for s in stops],
            **options,
        )  # fmt: skip
        stop = set(stops)
        out = []
        for result in results:
            for ids in result.sequences_ids:
                end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
                out.append(list(ids[:end]))
        return out

    def log_probs(self, rows: Sequence[Sequence[int]]) -> list[list[float]]:
        """For each row, the log-probability of each token after the first given those
        before it (`len(row) - 1` values)."""
        results = self.generator.score_batch([[str(t) for t in row] for row in rows])
        return [list(r.log_probs) for r in results]
