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
  float32 one after some tokens; `compute_type="float32"` computes in float32 (greedy and
  sampled logits equal up to rounding, not bit for bit).
- sampling draws from CTranslate2's random generator: a seed reproduces a reply within
  this backend, not the torch backend's reply for the same seed, and a seeded sampling
  call reloads the model (a fraction of a second) unless nothing drew since that seed.
- options whose meaning would change are refused in one line: repetition penalties
  (CTranslate2 would not count all of the context), beam search unless
  `early_stopping=True` (CTranslate2's beams stop as soon as that many are done).
- a model trained with token types keeps a converted copy per reply parity (twice
  the converted weights in memory once contexts of both parities came).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.errors import ConvcliError, UsageError
from convcli.inference.settings import ComputeType

if TYPE_CHECKING:
    from types import ModuleType

COMPUTE_TYPES: tuple[str, ...] = typing.get_args(ComputeType)
# Bump when the conversion below changes: older cached conversions are then ignored.
CONVERSION_VERSION = 2  # 2: each conversion keeps a snapshot of the folder's loading
# Written beside a conversion by whoever converted (see convcli.inference.ct2_loading).
SNAPSHOT_FILE = "convcli-loaded.json"
# A conversion's temp folder this old belongs to a process that died while converting.
STALE_TEMP_SECONDS = 3600
# transformers `generate` options and what CTranslate2 calls them.
RENAMED = {
    "num_return_sequences": "num_hypotheses",
    "num_beams": "beam_size",
    "top_k": "sampling_topk",
    "top_p": "sampling_topp",
    "temperature": "sampling_temperature",
}
# Options that only matter to transformers (handled here by other means).
IGNORED = {"pad_token_id", "use_cache", "early_stopping"}
# Options that mean something else in CTranslate2, with why (refused unless a no-op).
DIFFERENT = {
    "repetition_penalty": (1.0, "CTranslate2 would not penalise all of the context's tokens"),
    "no_repeat_ngram_size": (0, "CTranslate2 would not see all of the context's n-grams"),
}


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


def engine_device(device: str | None) -> str:
    """The device to decode on ("cpu", "cuda" or "cuda:N"), checked with CTranslate2 (no
    torch): `None` or "auto" picks CUDA when CTranslate2 sees a GPU, else CPU."""
    cuda = require_ctranslate2().get_cuda_device_count()
    if device in (None, "auto"):
        return "cuda" if cuda else "cpu"
    kind, colon, index = device.partition(":")
    if kind == "cpu" and not colon:
        return device
    if kind == "cuda" and (not colon or index.isdigit()):
        if int(index or 0) >= cuda:
            raise UsageError(
                f"`device` {device}: CTranslate2 sees {cuda} CUDA device(s) here", param="device"
            )
        return device
    raise UsageError(
        f"`device` {device}: the ctranslate2 backend runs on cpu, cuda or cuda:N", param="device"
    )


def check_compute_type(device: str, compute_type: str) -> None:
    """Refuse a compute type CTranslate2 cannot run on `device` (as `engine_device` gives
    it), in one line."""
    kind, _, index = device.partition(":")
    supported = require_ctranslate2().get_supported_compute_types(kind, int(index or 0))
    if compute_type not in supported:
        raise UsageError(
            f"`compute_type` {compute_type} does not run on this {kind.upper()}: "
            f"choose one of {', '.join(t for t in COMPUTE_TYPES if t in supported)}",
            param="compute_type",
        )


def find_conversion(ident: dict[str, Any]) -> Path | None:
    """The cached conversion for `ident` (see `identity`), when there is one."""
    target = cache_root() / cache_key(ident)
    return target if (target / "model.bin").is_file() else None


def quantization_for(compute_type: str) -> str | None:
    """How the weights are stored for a compute type: as they are computed."""
    return None if compute_type == "float32" else compute_type


def identity(folder: Path, compute_type: str, response_type: int | None) -> dict[str, Any]:
    """What a conversion depends on: the folder's files as they are now, and how it is
    stored. A file rewritten in place changes its ctime (which no tool can set back),
    replaced by another its inode: either gives a new conversion."""
    ct2 = require_ctranslate2()
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            st = path.stat()
            files.append([path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return {
        "folder": str(folder.resolve()),
        "files": files,
        "storage": quantization_for(compute_type),
        "response_type": response_type,
        "ctranslate2": ct2.__version__,
        "conversion": CONVERSION_VERSION,
    }


def cache_key(ident: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{Path(ident['folder']).name}-{digest[:16]}"


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
    folder: Path, compute_type: str, sep_token_id: int, response_type: int | None = None,
    report: Callable[[str], None] | None = None, snapshot: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """The cached conversion of `folder` (made now when missing; `report` hears of it
    first, as it takes seconds), with `snapshot` beside it (`SNAPSHOT_FILE`) when it was
    taken from the files converted now.

    The conversion is written to a temp folder beside its final name and renamed into
    place, so a crash leaves no half-written model, and of two processes converting at
    once the second uses the first one's copy. Once it is in place, the conversions of
    earlier versions of the same folder and the temp folders of dead processes go.
    """
    from convcli.outputs import named_os_errors, rename_noreplace

    root = cache_root()
    ident = identity(folder, compute_type, response_type)
    target = root / cache_key(ident)
    if (target / "model.bin").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    except OSError as exc:
        raise ConvcliError(
            f"cannot keep converted models in {root}: {exc.strerror or exc} (set "
            "CONVCLI_CACHE to a folder you can write)"
        ) from None
    if report is not None:
        kind = "" if response_type is None else f", replies of token type {response_type}"
        report(f"converting {folder} for the ctranslate2 backend ({compute_type}{kind}), once: "
               f"{target}")  # fmt: skip
    with named_os_errors(root):
        try:
            convert(folder, tmp, compute_type, sep_token_id, response_type)
            (tmp / "identity.json").write_text(json.dumps(ident), encoding="utf-8")
            if snapshot is not None and snapshot.get("files") == ident["files"]:
                (tmp / SNAPSHOT_FILE).write_text(json.dumps(snapshot), encoding="utf-8")
            try:
                if not rename_noreplace(tmp, target):  # no renameat2 here (macOS...)
                    os.rename(tmp, target)  # fails when target exists and is not empty
            except OSError as exc:
                won = exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
                if not (won and (target / "model.bin").is_file()):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process was faster
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prune(root, ident, keep=target)
    return target


def prune(root: Path, ident: dict[str, Any], keep: Path) -> None:
    """Remove the conversions of other versions of `ident`'s folder (same storage and
    parity) and temp folders left by processes that died converting."""
    same = ("folder", "storage", "response_type")
    for entry in root.iterdir():
        if entry == keep or not entry.is_dir():
            continue
        try:
            if entry.name.startswith("."):
                stale = time.time() - entry.stat().st_mtime > STALE_TEMP_SECONDS
            else:
                other = json.loads((entry / "identity.json").read_text(encoding="utf-8"))
                stale = all(other.get(k) == ident[k] for k in same)
        except (OSError, ValueError):
            continue  # not ours, or being written: leave it
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def ct2_options(hf_kwargs: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """transformers `generate` options as CTranslate2 `generate_batch` options; what
    CTranslate2 would do differently is refused in one line."""
    # The stop token comes back (as transformers keeps it) for the caller's cut rule.
    options: dict[str, Any] = {"max_length": max_new_tokens, "include_prompt_in_result": False,
                               "return_end_token": True}  # fmt: skip
    kwargs = dict(hf_kwargs)
    sample = bool(kwargs.pop("do_sample", False))
    early_stopping = kwargs.get("early_stopping")
    min_new = kwargs.pop("min_new_tokens", None)
    if min_new is not None:
        options["min_length"] = min(int(min_new), max_new_tokens)
    for name, (no_op, why) in DIFFERENT.items():
        value = kwargs.pop(name, None)
        if value is not None and value != no_op:
            raise UsageError(
                f"the ctranslate2 backend does not take `{name}` ({why}): use the torch backend"
            )
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
    if options.get("beam_size", 1) > 1 and (sample or early_stopping is not True):
        raise UsageError(
            "the ctranslate2 backend's beam search stops once `num_beams` replies are done, "
            "as transformers' early_stopping=True: set the generation option "
            "`early_stopping` to true, or use the torch backend"
            if not sample
            else "the ctranslate2 backend samples without beams: drop `num_beams`"
        )
    if sample:
        if options.get("sampling_topp", 1.0) <= 0:
            raise UsageError("`top_p` must be above 0 on the ctranslate2 backend", param="top_p")
        if options.get("sampling_temperature", 1.0) <= 0:
            raise UsageError("`temperature` must be positive to sample", param="temperature")
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
        threads: int, token_types: bool, report: Callable[[str], None] | None = None,
        snapshot: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """`device` as `engine_device` gives it; `snapshot`: kept beside conversions made
        here (see convcli.inference.ct2_loading)."""
        if not folder.is_dir():
            raise ConvcliError(f"{folder}: the ctranslate2 backend needs a local model folder")
        check_compute_type(device, compute_type)  # before any conversion
        kind, _, index = device.partition(":")
        self.device, self.device_index = kind, int(index or 0)
        self.folder, self.compute_type, self.threads = folder, compute_type, threads
        self.sep_token_id, self.token_types = sep_token_id, token_types
        self.report, self.snapshot = report, snapshot
        self.vocab_size = 0
        self._generators: dict[int | None, Any] = {}
        self._paths: dict[int | None, Path] = {}  # reloads (reseed) keep what was loaded
        self._fresh_seed: int | None = None  # reseeded with it, and nothing drew since
        self.generator(0 if token_types else None)  # convert (once) and load now

    def generator(self, response_type: int | None) -> Any:
        """The generator for replies of `response_type` (None: a model without types)."""
        if response_type not in self._generators:
            ct2 = require_ctranslate2()
            path = self._paths.get(response_type) or converted_folder(
                self.folder, self.compute_type, self.sep_token_id, response_type, self.report,
                self.snapshot,
            )  # fmt: skip
            self._paths[response_type] = path
            try:
                self._generators[response_type] = ct2.Generator(
                    str(path),
                    device=self.device,
                    device_index=self.device_index,
                    compute_type=self.compute_type,
                    intra_threads=self.threads,
                    inter_threads=1,
                )
            except (RuntimeError, ValueError) as exc:
                raise ConvcliError(f"cannot load {path} with CTranslate2: {exc}") from exc
            if not self.vocab_size:  # the same for every table: read once, not per reseed
                rows = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
                self.vocab_size = len(rows) // (2 if response_type is not None else 1)
        return self._generators[response_type]

    def reseed(self, seed: int) -> None:
        """Make the next sampling draw from `seed`.

        CTranslate2 seeds a worker thread's random generator when the thread starts, so
        a seed takes fresh generators (loading a converted model takes a fraction of a
        second, from the page cache); skipped when nothing drew since the same seed.
        """
        seed = int(seed) % 2**32
        if seed == self._fresh_seed:
            return
        require_ctranslate2().set_random_seed(seed)
        loaded = list(self._generators)
        self._generators.clear()
        for response_type in loaded:
            self.generator(response_type)
        self._fresh_seed = seed

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
        on_token: Callable[[int, int], bool] | None = None,
        **hf_kwargs: Any,
    ) -> list[list[int]]:
        """The generated ids of every hypothesis of every prompt, prompt-major, with the
        stop token that ended them (`reseed` first for reproducible samples).

        With token types, prompts are grouped by the type their reply takes (their last
        token's) and each group runs on its own table; the order is kept. `on_token(prompt
        index, token id)` hears each token as it comes (one hypothesis per prompt, no
        beams); it returns True to end that prompt's decoding there.
        """
        options = ct2_options(hf_kwargs, max_new_tokens)
        k = options.get("num_hypotheses", 1)
        if options["sampling_topk"] == 1 and options.get("beam_size", 1) == 1 and k > 1:
            # top-k 1 is greedy in CTranslate2, which gives one hypothesis: k copies.
            options["num_hypotheses"] = 1
            prompts = [p for p in prompts for _ in range(k)]
        groups: dict[int | None, list[int]] = {}
        for i, (_, types) in enumerate(prompts):
            key = types[-1] if self.token_types and types is not None else None
            groups.setdefault(key, []).append(i)
        per_prompt: dict[int, list[list[int]]] = {}
        for key, members in groups.items():
            if on_token is not None:
                options["callback"] = lambda step, of=members: bool(
                    on_token(of[step.batch_id], step.token_id)
                )
            results = self.generator(key).generate_batch(
                [self.tokens(prompts[i], key) for i in members],
                end_token=[int(s) for s in stops], **options,
            )  # fmt: skip
            for i, result in zip(members, results, strict=True):
                per_prompt[i] = [list(ids) for ids in result.sequences_ids]
        if options["sampling_topk"] != 1:
            self._fresh_seed = None  # something drew
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
