"""The loading gate: no code from a folder or checkpoint runs (stdin answering "y"), foreign
architectures and lying configs are refused before allocating, a run directory stands for
its final/, missing tokenizer files, unknown devices and offline names are one line
(issues 11.1, 11.2, 14.1, 14.2, 15.1, 15.2)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from convcli.cli.app import app
from tests.conftest import DIALOGUES, run_cli, tiny_gpt2

runner = CliRunner()

# Code a malicious folder ships: it leaves a file behind if it ever runs.
EVIL = """
from pathlib import Path
Path({marker!r}).write_text("code from the folder ran")
from transformers import GPT2LMHeadModel as EvilModel, PreTrainedTokenizerFast as EvilTokenizer
"""


def craft_code(folder: Path, config_name: str, auto_map: dict[str, object], marker: Path) -> None:
    """Add `evil.py` and an `auto_map` pointing at it to `folder/config_name`."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config_path = folder / config_name
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config))


@pytest.fixture
def evil_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "RAN"
    craft_code(folder, "config.json", {"AutoModelForCausalLM": "evil.EvilModel"}, marker)
    return folder, marker


def assert_refused_without_running(result, marker: Path, folder: object) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {folder} ships custom code")
    assert "never runs code" in result.stderr and "Traceback" not in result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    assert not marker.exists()


# -- 11.1 remote code --------------------------------------------------------------------------


def test_generate_refuses_a_model_folder_with_code_and_stdin_saying_yes(evil_model):
    folder, marker = evil_model
    result = run_cli("generate", str(folder), "Hello", input="y\ny\n", timeout=120)
    assert_refused_without_running(result, marker, folder)


def test_chat_refuses_a_model_folder_with_code_and_stdin_saying_yes(evil_model):
    folder, marker = evil_model
    result = run_cli("chat", str(folder), input="y\nHello\n/quit\n", timeout=120)
    assert_refused_without_running(result, marker, folder)


@pytest.mark.parametrize("command", ["train", "eval", "generate-mmi"])
def test_train_eval_and_a_reverse_model_refuse_a_folder_with_code(
    command, evil_model, make_shards, tmp_path, tiny_model_dir
):
    folder, marker = evil_model
    shards = make_shards()
    args = {
        "train": ["train", "-d", str(shards), "--model", str(folder), "-o", str(tmp_path / "r")],
        "eval": ["eval", str(folder), "--data", str(shards)],
        "generate-mmi": ["generate", str(tiny_model_dir), "Hi", "--reverse-model", str(folder)],
    }[command]

    result = runner.invoke(app, args, input="y\n")

    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {folder} ships custom code")
    assert not marker.exists()


def test_prepare_refuses_a_tokenizer_folder_with_code(tmp_path, tiny_tokenizer_dir):
    folder = tmp_path / "evil-tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    marker = tmp_path / "RAN"
    craft_code(folder, "tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
               marker)  # fmt: skip
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES))
    args = ["prepare", str(source), "-o", str(tmp_path / "out"), "--tokenizer", str(folder)]

    result = runner.invoke(app, args, input="y\n")

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {folder} ships custom code (evil.py, auto_map in tokenizer_config.json); "
        "convcli never runs code from a model or tokenizer folder: use a folder without it"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_a_checkpoint_whose_tokenizer_ships_code(tmp_path, tiny_tokenizer_dir):
    marker = tmp_path / "RAN"
    files = {p.name: p.read_bytes() for p in tiny_tokenizer_dir.iterdir() if p.is_file()}
    config = json.loads(files["tokenizer_config.json"])
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    files["tokenizer_config.json"] = json.dumps(config).encode()
    files["evil.py"] = EVIL.format(marker=str(marker)).encode()
    model = tiny_gpt2(len(json.loads(files["tokenizer.json"])["model"]["vocab"]), n_positions=32)
    ckpt = tmp_path / "run.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"settings": {}, "config": model.config.to_dict(), "meta": {}},
            "convcli": {"tokenizer": files},
        },
        ckpt,
    )

    result = runner.invoke(app, ["convert", str(ckpt), "-o", str(tmp_path / "out")], input="y\n")

    assert result.exit_code == 1, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: the tokenizer kept in {ckpt} ships custom code (evil.py")
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- 11.2 foreign architectures and lying configs ----------------------------------------------


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_foreign_architecture_is_refused_before_building(tmp_path, tiny_model_dir):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, folder)
    edit_config(folder, model_type="llama", hidden_size=8192, num_hidden_layers=80)

    result = runner.invoke(app, ["generate", str(folder), "Hello"])

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {folder / 'config.json'}: model_type 'llama' is not an architecture convcli "
        "runs (gpt2: GPT-2 and DialoGPT models)"
    )


LIES = {
    # 48 layers of 25600: ~400 GB of float32 if it were built
    "layers and width": (
        {"n_layer": 48, "n_embd": 25600, "n_head": 32},
        "n_embd 25600 vs 64, n_layer 48 vs 2, n_inner 102400 vs 256",
    ),
    "MLP width": ({"n_inner": 10**9}, "n_inner 1000000000 vs 256"),  # ~500 GB
}


@pytest.mark.parametrize("lie", list(LIES))
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_a_config_larger_than_its_weights_is_refused_before_allocating(
    tmp_path, tiny_model_dir, weights, lie
):
    folder = tmp_path / "liar"
    shutil.copytree(tiny_model_dir, folder)
    if weights == "bin":  # the older file format of the hub's DialoGPT releases
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    changes, differ = LIES[lie]
    edit_config(folder, **changes)

    started = time.monotonic()
    result = runner.invoke(app, ["generate", str(folder), "Hello"])

    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {folder}: config.json does not match the weights ({differ} in the "
        "weights); refusing to build it"
    )


# -- 14.1, 14.2: what a newcomer gives ---------------------------------------------------------


def test_a_model_folder_without_tokenizer_files_is_one_line(tmp_path, tiny_model_dir):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "convcli.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)

    generated = runner.invoke(app, ["generate", str(folder), "Hi"])
    chatted = runner.invoke(app, ["chat", str(folder)], input="Hi\n")

    for result in (generated, chatted):
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr.strip().startswith(
            f"error: {folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
        )


def test_a_run_directory_stands_for_its_final_model_and_says_so(tmp_path, trained):
    run = tmp_path / "runs" / "en"
    shutil.copytree(trained[0], run / "final")
    shutil.copytree(trained[0], run / "best")
    (run / "train.yaml").write_text("# convcli train\n")

    result = runner.invoke(app, ["generate", str(run), "Hello"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert (
        f"{run} is a training run: using its final model {run / 'final'}; {run / 'best'} holds "
        "the best by validation loss"
    ) in result.stderr


def test_a_run_directory_without_final_points_at_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.yaml").write_text("# convcli train\n")

    result = runner.invoke(app, ["generate", str(run), "Hello"])

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {run} is a training run without a final model yet; use {run / 'best'} if it "
        f"exists, or `convcli convert` one of {run / 'checkpoints'}/*.ckpt into a folder"
    )


# -- 15.1 devices, 15.2 names while offline ----------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "tpu"])
def test_a_device_this_machine_lacks_is_one_line_exit_2(device, tiny_model_dir):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    for command in (["generate", str(tiny_model_dir), "Hi"], ["chat", str(tiny_model_dir)]):
        result = runner.invoke(app, [*command, "--device", device], input="Hi\n")
        assert result.exit_code == 2, result.stderr
        line = result.stderr.strip()
        assert line.startswith(f"error: --device {device}") and "\n" not in line
        assert "this torch build can use: cpu" in line


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["offline", "unreachable"],
)
def test_a_missing_name_fails_within_seconds_while_offline(tmp_path, env, monkeypatch):
    import convcli.loadgate

    monkeypatch.setattr(convcli.loadgate, "_reachable", {})
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES))
    args = ["prepare", str(source), "-o", str(tmp_path / "o"), "--tokenizer", "nope-tok"]

    started = time.monotonic()
    result = runner.invoke(app, args, env=env)

    assert time.monotonic() - started < 5
    assert result.exit_code == 1
    offline = env["HF_HUB_OFFLINE"]
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
    assert result.stderr.strip() == (
        f"error: tokenizer 'nope-tok': not a folder here, and {why}; give a local folder"
    )
