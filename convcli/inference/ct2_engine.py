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

Token types: GPT-2 adds `wte[type]` to a token's embedding, and CTranslate2's GPT-2
has no input for it. Types here are 0 or 1 (the turn's parity), and every generated
token takes the type of the context's final sep (`r`). So a model trained with token
types is converted once per `r`, with twice the vocabulary: row `id` embeds
`wte[id] + wte[r]` (generated tokens and context tokens of type `r`), row `V + id`
embeds `wte[id] + wte[1 - r]` (context tokens of the other type); the output layer
keeps its V rows. The numbers are the model's own, with one addition folded in.

What differs from the torch backend, plainly:
- int8 weights change the logits a little, so a greedy reply can part from the
  float32 one after some tokens; `compute_type="float32"` computes in float32 (the same
  numbers up to rounding, not bit for bit).
- sampling draws from CTranslate2's random generator: a seed reproduces a reply within
  this backend, not the torch backend's reply for the same seed.
- a model trained with token types keeps a converted copy per reply parity (twice
  the converted weights in memory once contexts of both parities came).
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


def cache_key(folder: Path, compute_type: str, response_type: int | None = None) -> str:
    """A name for the conversion of `folder`'s current files at `compute_type` (for
    replies of token type `response_type`, when the model has token types)."""
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
        "response_type": response_type,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{folder.resolve().name}-{digest[:16]}"


def convert(
    folder: Path, output: Path, compute_type: str, sep_token_id: int,
    response_type: int | None = None,
) -> None:  # fmt: skip
    """Write the GPT-2 in `folder` as a CTranslate2 model folder at `output`.

    CTranslate2's own GPT-2 loader maps the layers; the vocabulary is the ids' numbers,
    so no tokenizer is involved and ids round-trip exactly. With `response_type`, the
    embeddings fold in the token types (see the module's docstring).
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
    vocab = model.config.vocab_size
    if response_type is not None:
        wte = model.get_input_embeddings().weight.detach()
        r = response_type
        spec.decoder.embeddings.weight = torch.cat((wte + wte[r], wte + wte[1 - r])).numpy()
        vocab *= 2
    spec.register_vocabulary([str(i) for i in range(vocab)])
    spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = str(sep_token_id)
    spec.config.layer_norm_epsilon = model.config.layer_norm_epsilon
    spec.validate()
    spec.optimize(quantization=quantization_for(compute_type))
    spec.save(str(output))


def converted_folder(
    folder: Path, compute_type: str, sep_token_id: int, response_type: int | None = None
) -> Path:
    """The cached conversion of `folder` (made now when missing).

    The conversion is written to a temporary folder beside its final name and renamed
    into place, so a crash leaves no half-written model and two processes converting
    at once both end with one whole copy.
    """
    from convcli.outputs import rename_noreplace

    root = cache_root()
    target = root / cache_key(folder, compute_type, response_type)
    if (target / "model.bin").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        convert(folder, tmp, compute_type, sep_token_id, response_type)
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


# A prompt or a scored row: its ids, and their token types when the model uses them.
Row = tuple[Sequence[int], Sequence[int] | None]


class CT2Engine:
    """CTranslate2 generators for one model folder: generation and scoring by ids.

    Converted models load on first use: one, or one per reply parity for a model with
    token types (`None`, or 0 and 1, below).
    """

    def __init__(
        self, folder: Path, *, device: str, compute_type: str, sep_token_id: int,
        threads: int, token_types: bool,
    ) -> None:  # fmt: skip
        if compute_type not in COMPUTE_TYPES:  # before any conversion
            raise UsageError(
                f"`compute_type` must be one of {', '.join(COMPUTE_TYPES)}, got {compute_type!r}",
                param="compute_type",
            )
        if not folder.is_dir():
            raise ConvcliError(f"{folder}: the ctranslate2 backend needs a local model folder")
        self.folder, self.compute_type, self.threads = folder, compute_type, threads
        self.sep_token_id, self.token_types = sep_token_id, token_types
        kind, _, index = device.partition(":")
        self.device, self.device_index = kind, int(index or 0)
        self.vocab_size = 0
        self._generators: dict[int | None, Any] = {}
        self.generator(0 if token_types else None)  # convert (once) and load now

    def generator(self, response_type: int | None) -> Any:
        """The generator for replies of `response_type` (None: a model without types)."""
        if response_type not in self._generators:
            ct2 = require_ctranslate2()
            path = converted_folder(
                self.folder, self.compute_type, self.sep_token_id, response_type
            )
            self._generators[response_type] = ct2.Generator(
                str(path),
                device=self.device,
                device_index=self.device_index,
                compute_type=self.compute_type,
                intra_threads=self.threads,
                inter_threads=1,
            )
            rows = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
            self.vocab_size = len(rows) // (2 if response_type is not None else 1)
        return self._generators[response_type]

    def reseed(self, seed: int) -> None:
        """Make the next calls draw from `seed`.

        CTranslate2 seeds a worker thread's random generator when the thread starts, so
        a seed takes fresh generators (loading a converted model takes a fraction of a
        second, from the page cache).
        """
        ct2 = require_ctranslate2()
        ct2.set_random_seed(int(seed) % 2**32)
        loaded = list(self._generators)
        self._generators.clear()
        for response_type in loaded:
            self.generator(response_type)

    def tokens(self, row: Row, response_type: int | None) -> list[str]:
        """A row as the vocabulary names of the table for `response_type`."""
        ids, types = row
        if response_type is None or types is None:
            return [str(t) for t in ids]
        v = self.vocab_size
        return [str(t if k == response_type else v + t) for t, k in zip(ids, types, strict=True)]

    def generate(
        self,
        prompts: Sequence[Row],
        max_new_tokens: int,
        stops: Sequence[int],
        **hf_kwargs: Any,
    ) -> list[list[int]]:
        """The reply ids of every hypothesis of every prompt, prompt-major, each cut
        before its first stop id (`reseed` first for reproducible samples).

        With token types, prompts are grouped by the type their reply takes (their last
        token's) and each group runs on its own table; the order is kept.
        """
        options = ct2_options(hf_kwargs, max_new_tokens)
        groups: dict[int | None, list[int]] = {}
        for i, (_, types) in enumerate(prompts):
            key = types[-1] if self.token_types and types is not None else None
            groups.setdefault(key, []).append(i)
        per_prompt: dict[int, list[list[int]]] = {}
        stop = set(stops)
        for key, members in groups.items():
            results = self.generator(key).generate_batch(
                [self.tokens(prompts[i], key) for i in members],
                end_token=[int(s) for s in stops], **options,
            )  # fmt: skip
            for i, result in zip(members, results, strict=True):
                per_prompt[i] = [
                    list(ids[: next((j for j, t in enumerate(ids) if t in stop), len(ids))])
                    for ids in result.sequences_ids
                ]
        return [reply for i in range(len(prompts)) for reply in per_prompt[i]]

    def log_probs(self, rows: Sequence[Row]) -> list[list[float]]:
        """For each row, the log-probability of each token after the first given those
        before it (`len(ids) - 1` values)."""
        if not self.token_types:
            results = self.generator(None).score_batch([self.tokens(row, None) for row in rows])
            return [list(r.log_probs) for r in results]
        # score_batch reads each token as input and as target, and a token of the other
        # type is row V + id as input but must be scored as id: score from the output
        # log-probabilities instead (rows x positions x V, one call).
        import numpy as np

        out = self.generator(0).forward_batch(
            [self.tokens(row, 0) for row in rows], return_log_probs=True
        )
        logp = np.asarray(out)
        return [
            [float(logp[b, j, ids[j + 1]]) for j in range(len(ids) - 1)]
            for b, (ids, _) in enumerate(rows)
        ]
