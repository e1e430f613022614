from __future__ import annotations

import json

import pytest
import torch

from convcli.errors import ConvcliError
from convcli.modelfolder import ModelMeta, load_model_folder, save_model_folder
from tests.conftest import tiny_gpt2


def test_saved_folder_loads_with_plain_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "convcli.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.generation_config.eos_token_id == tokenizer.sep_token_id
    meta = json.loads((tiny_model_dir / "convcli.json").read_text())
    assert meta["format"] == "convcli-model" and meta["token_types"] is True


def test_load_model_folder_returns_model_tokenizer_and_meta(tiny_model_dir):
    loaded = load_model_folder(tiny_model_dir, device="cpu")
    assert loaded.meta.token_types and not loaded.meta.reverse
    assert loaded.meta.tokenizer_fingerprint == loaded.tokenizer.fingerprint()
    assert not loaded.model.training
    assert loaded.model.device == torch.device("cpu")


def test_existing_output_is_refused_and_nothing_half_written(tiny_tokenizer, tmp_path):
    model = tiny_gpt2(len(tiny_tokenizer))
    meta = ModelMeta(token_types=False, sep_token_id=tiny_tokenizer.sep_token_id)
    out = save_model_folder(model, tiny_tokenizer, meta, tmp_path / "m")
    with pytest.raises(ConvcliError, match="already exists"):
        save_model_folder(model, tiny_tokenizer, meta, out)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    model.save_pretrained = boom
    with pytest.raises(RuntimeError):
        save_model_folder(model, tiny_tokenizer, meta, tmp_path / "m2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_tokenizer_larger_than_embeddings_is_refused(tiny_tokenizer, tmp_path):
    model = tiny_gpt2(len(tiny_tokenizer) - 10)
    meta = ModelMeta(token_types=False, sep_token_id=tiny_tokenizer.sep_token_id)
    out = save_model_folder(model, tiny_tokenizer, meta, tmp_path / "m")
    with pytest.raises(ConvcliError, match="do not belong together"):
        load_model_folder(out)


def test_missing_folder_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConvcliError, match="model folder not found"):
        load_model_folder(tmp_path / "nope")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConvcliError, match="model folder not found: runs/mdl"):
        load_model_folder("runs/mdl")  # a typo, not a hub organisation


def test_written_folder_has_ordinary_permissions(tiny_model_dir):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(tiny_model_dir.stat().st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in tiny_model_dir.iterdir())
