"""convert_checkpoint: DialoGPT-layout checkpoints in every variant, bad inputs, safety."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from convcli.conversion.convert import convert_checkpoint
from convcli.errors import ConvcliError, UsageError
from convcli.modelfolder import load_model_folder, save_model_folder
from convcli.outputs import MARKER, write_marker
from tests.conftest import tiny_gpt2

IDS = torch.tensor([[0, 5, 17, 42, 0, 99, 3, 0]])


def dialogpt_state(
    model,
    *,
    prefix: str = "",
    transformer: bool = True,
    head: str | None = "decoder",
    buffers: tuple[str, ...] = ("bias",),
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """A state dict laid out like DialoGPT's released files (or one of their variants)."""
    n = model.config.n_positions
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            if head is None:
                continue
            key = "lm_head.decoder.weight" if head == "decoder" else key
            value = value.clone()  # DialoGPT saved a separate copy equal to wte
        state[key] = value.to(dtype)
    for i in range(model.config.n_layer):
        if "bias" in buffers:
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        if "masked_bias" in buffers:
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not transformer:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    return {prefix + k: v for k, v in state.items()}


def save(state, path: Path, *, legacy: bool = True) -> Path:
    # The released .pkl files predate torch's zip format; newer saves use it.
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def rounded(model, dtype: torch.dtype):
    """The original model with its weights rounded as the checkpoint stores them."""
    return copy.deepcopy(model).to(dtype).float()


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture
def model(tiny_tokenizer):
    return tiny_gpt2(len(tiny_tokenizer), n_positions=32)


VARIANTS = {
    # the released layout: module.-prefixed multi-GPU save, fp16, lm_head.decoder copy, masks
    "release": dict(prefix="module.", head="decoder", buffers=("bias",), dtype=torch.float16),
    "raw-gpt2": dict(transformer=False, head="weight", buffers=("masked_bias",)),
    "tied-both-buffers": dict(head=None, buffers=("bias", "masked_bias"), legacy=False),
    "fp32-no-buffers": dict(prefix="module.", buffers=(), dtype=torch.float32, legacy=False),
    "fp32-lm-head-weight": dict(head="weight", dtype=torch.float32),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_converts_to_the_same_logits(variant, model, tmp_path, tiny_tokenizer_dir):
    options = dict(VARIANTS[variant])
    legacy = options.pop("legacy", True)
    dtype = options.get("dtype", torch.float16)
    ckpt = save(dialogpt_state(model, **options), tmp_path / "model.pkl", legacy=legacy)

    report = convert_checkpoint(
        ckpt,
        tmp_path / "out",
        tokenizer=tiny_tokenizer_dir,
        n_head=4,
        reverse=variant == "raw-gpt2",
    )

    loaded = load_model_folder(tmp_path / "out")
    assert loaded.meta.token_types is False
    assert loaded.meta.reverse is (variant == "raw-gpt2")
    assert loaded.meta.made_by == "convert"
    assert loaded.model.config.tie_word_embeddings
    diff = (logits(loaded.model) - logits(rounded(model, dtype))).abs().max().item()
    assert diff < 1e-5
    assert report.max_logit_diff is not None and report.max_logit_diff < 1e-5
    assert (report.n_layer, report.n_embd, report.n_head) == (2, 64, 4)
    assert report.source_dtype == str(dtype).removeprefix("torch.")
    n_buffers = 2 * len(options.get("buffers", ("bias",)))
    n_head_copies = 1 if options.get("head", "decoder") else 0
    assert len(report.dropped) == n_buffers + n_head_copies
    assert not any(k.endswith("c_attn.bias") for k in report.dropped)
    assert leftovers(tmp_path, set()) == ["model.pkl", "out"]


def test_a_real_lm_head_is_kept_untied(model, tmp_path, tiny_tokenizer_dir):
    model.config.tie_word_embeddings = False
    untied = tiny_gpt2(len(model.transformer.wte.weight), n_positions=32)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(torch.randn_like(untied.lm_head.weight))
    state = dialogpt_state(untied, head="weight", dtype=torch.float32)
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])

    report = convert_checkpoint(
        save(state, tmp_path / "m.pkl"), tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4
    )

    assert not report.tied
    loaded = load_model_folder(tmp_path / "out")
    assert (logits(loaded.model) - logits(untied)).abs().max().item() < 1e-5


def test_real_gpt2_vocabulary(tmp_path, gpt2_tokenizer_dir):
    original = tiny_gpt2(50257, n_positions=32)
    ckpt = save(dialogpt_state(original, prefix="module."), tmp_path / "medium_ft.pkl")

    report = convert_checkpoint(ckpt, tmp_path / "out", tokenizer=gpt2_tokenizer_dir, n_head=4)

    loaded = load_model_folder(tmp_path / "out")
    ids = torch.tensor([loaded.tokenizer(["Hello", "How are you"])["input_ids"]])
    assert ids[0].tolist() == [50256, 15496, 50256, 2437, 389, 345, 50256]
    diff = (logits(loaded.model, ids) - logits(rounded(original, torch.float16), ids)).abs().max()
    assert diff.item() < 1e-5
    assert report.vocab_size == 50257 and loaded.meta.sep_token_id == 50256
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 50256


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 5e-3), ("bfloat16", 5e-2)])
def test_half_precision_folders(dtype, tolerance, model, tmp_path, tiny_tokenizer_dir):
    from convcli.conversion.verify import sample_inputs

    ckpt = save(dialogpt_state(model, dtype=torch.float32), tmp_path / "m.pkl")

    report = convert_checkpoint(
        ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4, dtype=dtype
    )

    loaded = load_model_folder(tmp_path / "out")
    half = getattr(torch, dtype)
    assert loaded.model.dtype == half
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
    # Judged independently of the converter: every weight is the original's, rounded once...
    saved, original = loaded.model.state_dict(), model.state_dict()
    for name, value in original.items():
        assert torch.equal(saved[name], value.to(half)), name
    # ... so the logits (upcast, as the converter compares them) differ from the float32
    # model's only by that rounding: a little, never nothing, never a wrong weight's 100%.
    upcast = copy.deepcopy(loaded.model).float()
    inputs = [IDS[0], *sample_inputs(loaded.tokenizer, len(loaded.tokenizer), 32)]
    ours = max(
        (logits(upcast, ids[None]) - logits(model, ids[None])).abs().max().item() for ids in inputs
    )
    assert 0 < ours < tolerance
    # The figure the converter reports is what it measured on its sample inputs.
    theirs = max(
        (logits(upcast, ids[None]) - logits(model, ids[None])).abs().max().item()
        for ids in inputs[1:]
    )
    assert report.dtype == dtype and report.max_logit_diff == pytest.approx(theirs, rel=1e-3)


def test_no_verify_still_writes_the_same_weights(model, tmp_path, tiny_tokenizer_dir):
    ckpt = save(dialogpt_state(model), tmp_path / "m.pkl")

    report = convert_checkpoint(
        ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4, verify=False
    )

    assert report.max_logit_diff is None
    loaded = load_model_folder(tmp_path / "out")
    assert (logits(loaded.model) - logits(rounded(model, torch.float16))).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("head", ["decoder", "untied"])
def test_no_verify_writes_the_folder_save_pretrained_writes(
    dtype, head, model, tmp_path, tiny_tokenizer_dir
):
    """No model is saved (verified or not): the folder must not tell the difference."""
    import json

    from safetensors.torch import load_file

    if head == "untied":
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    state = dialogpt_state(model, head="weight" if head == "untied" else head)
    ckpt = save(state, tmp_path / "m.pkl")
    for verify in (True, False):
        convert_checkpoint(
            ckpt, tmp_path / str(verify), tokenizer=tiny_tokenizer_dir, n_head=4,
            dtype=dtype, verify=verify,
        )  # fmt: skip
    verified, direct = tmp_path / "True", tmp_path / "False"
    loaded = load_model_folder(direct)
    hf = save_model_folder(loaded.model, loaded.tokenizer, loaded.meta, tmp_path / "hf")
    assert sorted(p.name for p in verified.iterdir()) == sorted(p.name for p in direct.iterdir())
    for folder in (verified, hf):
        for name in ("config.json", "generation_config.json"):
            assert json.loads((folder / name).read_text()) == json.loads(
                (direct / name).read_text()
            )
        ours, theirs = (
            load_file(direct / "model.safetensors"),
            load_file(folder / "model.safetensors"),
        )
        assert sorted(ours) == sorted(theirs) and ("lm_head.weight" in ours) is (head == "untied")
        assert all(
            ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours
        )


def test_size_is_inferred_from_the_tensors(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=48, n_embd=128, n_layer=3, n_head=2
    )
    original = GPT2LMHeadModel(config).eval()
    ckpt = save(dialogpt_state(original), tmp_path / "small_ft.pkl")

    report = convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir)

    assert (report.n_layer, report.n_embd, report.n_head, report.n_positions) == (3, 128, 2, 48)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"]) == (3, 128, 2)
    assert saved["activation_function"] == "gelu_new" and saved["layer_norm_epsilon"] == 1e-5
    loaded = load_model_folder(tmp_path / "out")
    assert (logits(loaded.model) - logits(rounded(original, torch.float16))).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (
            {"n_head": 5},
            "`n_head` 5 disagrees with the checkpoint: it does not divide its width 64",
        ),
        ({"n_layer": 24}, "`n_layer` 24 disagrees with the checkpoint, which has 2 layers"),
        ({"n_embd": 1024}, "`n_embd` 1024 disagrees with the checkpoint, whose width is 64"),
    ],
)
def test_disagreeing_sizes_are_errors(sizes, message, model, tmp_path, tiny_tokenizer_dir):
    ckpt = save(dialogpt_state(model), tmp_path / "m.pkl")
    with pytest.raises(UsageError, match=message):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, **sizes)
    assert leftovers(tmp_path, set()) == ["m.pkl"]


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [True, False])
def test_a_malicious_pickle_is_refused_and_never_runs(legacy, model, tmp_path, tiny_tokenizer_dir):
    marker = tmp_path / "pwned"
    state = dialogpt_state(model)
    state["transformer.extra"] = Payload(marker)  # type: ignore[assignment]
    ckpt = save(state, tmp_path / "evil.pkl", legacy=legacy)

    with pytest.raises(ConvcliError, match=r"refused: the pickle asks to run (posix|nt)\.system"):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir)

    assert not marker.exists()
    assert leftovers(tmp_path, set()) == ["evil.pkl"]


def _not_gpt2(tmp_path: Path, model) -> Path:
    return save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "bad.pkl")


def _incomplete(tmp_path: Path, model) -> Path:
    state = dialogpt_state(model)
    del state["transformer.h.1.mlp.c_fc.bias"]
    return save(state, tmp_path / "bad.pkl")


def _bad_shape(tmp_path: Path, model) -> Path:
    state = dialogpt_state(model)
    state["transformer.h.1.attn.c_attn.weight"] = torch.zeros(64, 190, dtype=torch.float16)
    return save(state, tmp_path / "bad.pkl")


def _extra_key(tmp_path: Path, model) -> Path:
    state = dialogpt_state(model)
    state["multiple_choice_head.summary.weight"] = torch.zeros(1, 64)
    return save(state, tmp_path / "bad.pkl")


def _text(tmp_path: Path, model) -> Path:
    (tmp_path / "bad.pkl").write_text("<html>404 Not Found</html>\n")
    return tmp_path / "bad.pkl"


def _empty(tmp_path: Path, model) -> Path:
    (tmp_path / "bad.pkl").write_bytes(b"")
    return tmp_path / "bad.pkl"


def _truncated(tmp_path: Path, model) -> Path:
    data = save(dialogpt_state(model), tmp_path / "full.pkl").read_bytes()
    (tmp_path / "full.pkl").unlink()
    (tmp_path / "bad.pkl").write_bytes(data[: len(data) // 2])
    return tmp_path / "bad.pkl"


BAD_INPUTS = {
    "missing": (lambda tmp, m: tmp / "nope.pkl", "checkpoint not found: .*nope.pkl"),
    "empty": (_empty, "empty file, not a checkpoint"),
    "text": (_text, "not a PyTorch checkpoint \\(neither a torch.save zip archive nor a pickle\\)"),
    "list": (lambda tmp, m: save([1, 2], tmp / "bad.pkl"), "holds a list, not a state dict"),
    "not-tensors": (
        lambda tmp, m: save({"epoch": 3, "lr": 0.1}, tmp / "bad.pkl", legacy=False),
        "a pickle that is not a state dict \\(2 of 2 entries are not named tensors",
    ),
    "not-gpt2": (_not_gpt2, "not a GPT-2 state dict: missing transformer.wte.weight"),
    "incomplete": (
        _incomplete,
        "incomplete GPT-2 state dict: missing transformer.h.1.mlp.c_fc.bias",
    ),
    "shapes": (
        _bad_shape,
        "inconsistent shapes: transformer.h.1.attn.c_attn.weight is \\[64, 190\\]",
    ),
    "extra-key": (
        _extra_key,
        "keys that are not part of GPT-2: multiple_choice_head.summary.weight",
    ),
    "truncated": (_truncated, "truncated or corrupt checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_clear_line(case, model, tmp_path, tiny_tokenizer_dir):
    make, message = BAD_INPUTS[case]
    ckpt = make(tmp_path, model)
    before = leftovers(tmp_path, set())

    with pytest.raises(ConvcliError, match=message) as raised:
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir)

    assert "\n" not in str(raised.value)
    assert leftovers(tmp_path, set()) == before  # no output, no temporary sibling


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, tiny_tokenizer_dir):
    small = tiny_gpt2(300, n_positions=32)
    ckpt = save(dialogpt_state(small), tmp_path / "m.pkl")
    with pytest.raises(ConvcliError, match=r"tokenizer has \d+ tokens but .* only 300"):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4)


def test_an_existing_output_needs_overwrite(model, tmp_path, tiny_tokenizer_dir):
    ckpt = save(dialogpt_state(model), tmp_path / "m.pkl")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(ConvcliError, match="already exists \\(pass `overwrite`"):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4)
    assert (tmp_path / "out" / "old.txt").exists()
    # `overwrite` replaces only a previous output of convert (its marker), nothing else.
    with pytest.raises(ConvcliError, match="not a previous output of `convcli convert`"):
        convert_checkpoint(
            ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4, overwrite=True
        )
    assert (tmp_path / "out" / "old.txt").exists()
    write_marker(tmp_path / "out", "convert")

    convert_checkpoint(
        ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4, overwrite=True
    )

    assert not (tmp_path / "out" / "old.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(UsageError, match="would replace the input"):
        convert_checkpoint(ckpt, ckpt, tokenizer=tiny_tokenizer_dir, overwrite=True)
    # An output folder that holds the checkpoint, named by another path, is refused too.
    with pytest.raises(UsageError, match="would replace the input"):
        convert_checkpoint(ckpt, tmp_path / ".." / tmp_path.name, overwrite=True)
    assert ckpt.is_file()


def _wrong_value(weights: dict[str, torch.Tensor]) -> None:
    weights["transformer.ln_f.bias"] = weights["transformer.ln_f.bias"] + 1.0


def _layers_swapped(weights: dict[str, torch.Tensor]) -> None:
    a, b = "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"
    weights[a], weights[b] = weights[b], weights[a]


def _key_missing(weights: dict[str, torch.Tensor]) -> None:
    del weights["transformer.h.1.ln_2.weight"]


CORRUPTIONS = {
    "wrong-value": (_wrong_value, "the folder's logits differ"),
    "layers-swapped": (_layers_swapped, "the folder's logits differ"),
    "key-missing": (_key_missing, "transformers reported .*missing_keys"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize(
    ("source", "dtype"),
    [(torch.float16, "float32"), (torch.float32, "float16"), (torch.float16, "float16")],
)
def test_a_wrong_folder_fails_verification_and_leaves_the_old_folder_alone(
    corruption, source, dtype, model, tmp_path, tiny_tokenizer_dir, monkeypatch
):
    """Whatever goes wrong between the checkpoint and the folder on disk is caught, whether
    the weights are widened (fp16 -> fp32), rounded (fp32 -> fp16) or kept as they are."""
    import convcli.conversion.convert as convert_module

    real_write = convert_module.write_folder
    corrupt, message = CORRUPTIONS[corruption]

    def corrupting_write(folder, weights, *args, **kwargs):
        corrupt(weights)
        return real_write(folder, weights, *args, **kwargs)

    monkeypatch.setattr(convert_module, "write_folder", corrupting_write)
    ckpt = save(dialogpt_state(model, dtype=source), tmp_path / "m.pkl")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    write_marker(tmp_path / "out", "convert")

    with pytest.raises(ConvcliError, match=f"verification failed: {message}"):
        convert_checkpoint(
            ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4, dtype=dtype,
            overwrite=True,
        )  # fmt: skip

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "old.txt"]
    assert leftovers(tmp_path, set()) == ["m.pkl", "out"]


def lightning_ckpt(model, path: Path, hparams: dict) -> Path:
    """What `convcli train` saves: Lightning's checkpoint dict, the HF model as `self.model`."""
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["loss_scale"] = torch.ones(1)  # something of the LightningModule's own
    torch.save(
        {
            "epoch": 0,
            "global_step": 7,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": state,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": hparams,
        },
        path,
    )
    return path


def test_a_lightning_checkpoint_recovers_its_tokenizer_and_config(
    model, tmp_path, tiny_tokenizer_dir
):
    hparams = {
        "tokenizer": str(tiny_tokenizer_dir),
        "model_config": model.config.to_dict(),  # n_head 4: not the 64-wide default
        "token_types": True,
        "output": tmp_path / "run",  # paths are allowed besides plain values
    }
    ckpt = lightning_ckpt(model, tmp_path / "last.ckpt", hparams)

    report = convert_checkpoint(ckpt, tmp_path / "out")

    assert report.kind == "lightning" and report.n_head == 4
    assert report.dropped == ["model.lm_head.weight", "loss_scale"]  # tied to wte; not the model
    loaded = load_model_folder(tmp_path / "out")
    assert loaded.meta.token_types is True
    assert loaded.meta.extra["global_step"] == 7
    assert (logits(loaded.model) - logits(model)).abs().max().item() < 1e-5


def test_a_lightning_checkpoint_without_a_tokenizer_needs_one(model, tmp_path, tiny_tokenizer_dir):
    ckpt = lightning_ckpt(model, tmp_path / "last.ckpt", {"lr": 1e-4})
    with pytest.raises(ConvcliError, match="do not name its tokenizer; pass `tokenizer`"):
        convert_checkpoint(ckpt, tmp_path / "out", n_head=4)

    report = convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir, n_head=4)

    assert load_model_folder(tmp_path / "out").meta.token_types is True
    assert any("token_types" in note for note in report.notes)


def test_the_float32_forward_of_half_weights_equals_a_float32_copys(model):
    """Verification widens one block at a time: same logits as a whole float32 copy, and
    the model keeps its half-precision (tied) weights."""
    from convcli.conversion.verify import float32_forward

    half = copy.deepcopy(model).half()
    with torch.inference_mode():
        got = float32_forward(half, IDS[0])
        want = copy.deepcopy(half).float()(IDS, attention_mask=torch.ones_like(IDS)).logits[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half.lm_head.weight is half.transformer.wte.weight
