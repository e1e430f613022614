"""`convcli convert` on real `convcli train` checkpoints: same model as the run's export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from convcli.conversion.convert import convert_checkpoint
from convcli.errors import ConvcliError
from convcli.modelfolder import load_model_folder
from convcli.training.fit import train
from tests.training.test_fit import Crash, settings

TURNS = ["Hello", "Hi, how are you?", "I am fine, thank you."]


def logits(folder: Path) -> torch.Tensor:
    """Logits of a conversation, fed as the folder's metadata says (token types or not)."""
    loaded = load_model_folder(folder)
    encoded = loaded.tokenizer(TURNS)
    types = torch.tensor([encoded["token_type_ids"]]) if loaded.meta.token_types else None
    with torch.no_grad():
        return loaded.model(torch.tensor([encoded["input_ids"]]), token_type_ids=types).logits


@pytest.fixture
def sep_shards(make_shards, tiny_tokenizer_dir, tmp_path) -> Path:
    """Shards whose tokenizer adds <sep> to the tiny one: the base model's would be wrong."""
    from convcli.tokenizer import load_hf_tokenizer

    bigger = load_hf_tokenizer(tiny_tokenizer_dir)
    bigger.add_special_tokens({"sep_token": "<sep>"})
    bigger.save_pretrained(str(tmp_path / "tok"))
    return make_shards(tokenizer_dir=tmp_path / "tok")


@pytest.mark.slow
def test_a_checkpoint_converts_to_the_model_the_run_exported(sep_shards, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    options = {"model": str(tiny_model_dir), "reverse": True, "token_types": False}
    train(settings(sep_shards, run, max_steps=4, save_every=2, **options), progress=False)
    shutil.rmtree(sep_shards)  # the checkpoint alone must do: shards move, runs get copied

    report = convert_checkpoint(run / "checkpoints" / "step-0000004.ckpt", tmp_path / "out")

    final, out = load_model_folder(run / "final").meta, load_model_folder(tmp_path / "out").meta
    assert report.kind == "lightning" and out.extra["global_step"] == final.extra["step"] == 4
    assert (out.token_types, out.reverse) == (final.token_types, final.reverse) == (False, True)
    assert out.sep_token_id == final.sep_token_id != 0  # the added <sep>, not the base's
    assert out.tokenizer_fingerprint == final.tokenizer_fingerprint
    assert (logits(tmp_path / "out") - logits(run / "final")).abs().max().item() < 1e-5


@pytest.mark.slow
def test_a_run_killed_before_its_export_is_recovered(make_shards, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(settings(make_shards(), run, model=str(tiny_model_dir), save_every=2),
              callbacks=[Crash(at=3)], progress=False)  # fmt: skip
    assert not (run / "final").exists()
    ckpt = run / "checkpoints" / "step-0000002.ckpt"

    convert_checkpoint(ckpt, tmp_path / "out")

    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    converted = load_model_folder(tmp_path / "out")
    assert converted.meta.token_types is True  # as the base model folder says
    for name, tensor in converted.model.state_dict().items():
        torch.testing.assert_close(tensor, saved["model." + name], rtol=0, atol=0)


def lightning_file(path: Path, state: dict, hparams: dict, **extra) -> Path:
    torch.save({"global_step": 3, "state_dict": state, "hyper_parameters": hparams, **extra}, path)
    return path


def test_a_foreign_lightning_checkpoint_is_one_clear_line(tmp_path, tiny_tokenizer_dir):
    ckpt = lightning_file(
        tmp_path / "bert.ckpt", {"encoder.layer.0.weight": torch.zeros(2, 2)}, {"lr": 0.1}
    )
    with pytest.raises(ConvcliError, match=r"not one of `convcli train`: .* no `model\.` weights"):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_a_convcli_checkpoint_of_another_architecture_is_named(tmp_path, tiny_tokenizer_dir):
    hparams = {"settings": {}, "config": {"model_type": "llama"}, "meta": {"token_types": False}}
    ckpt = lightning_file(tmp_path / "l.ckpt", {"model.x": torch.zeros(1)}, hparams)
    with pytest.raises(ConvcliError, match="holds a llama model; convert handles GPT-2"):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir)


def test_a_tokenizer_with_another_sep_is_refused(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2(len(tiny_tokenizer) + 1)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    meta = {"token_types": True, "sep_token_id": len(tiny_tokenizer), "reverse": False}
    hparams = {"settings": {}, "config": model.config.to_dict(), "meta": meta}
    ckpt = lightning_file(tmp_path / "s.ckpt", state, hparams)
    sep = tiny_tokenizer.sep_token_id
    message = f"trained with sep id {len(tiny_tokenizer)}, but the tokenizer's is {sep}"
    with pytest.raises(ConvcliError, match=message):
        convert_checkpoint(ckpt, tmp_path / "out", tokenizer=tiny_tokenizer_dir)
