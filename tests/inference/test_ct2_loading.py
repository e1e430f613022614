"""The ctranslate2 backend loads a converted folder without torch or transformers, and
answers exactly as the first (transformers) load of the same folder did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("ctranslate2", reason="the ctranslate2 backend is an optional extra")

# Runs `convcli ARGS` with torch and transformers made unimportable.
WITHOUT_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} was imported")
sys.meta_path.insert(0, Refuse())
sys.argv = ["convcli", *sys.argv[1:]]
from convcli.cli.app import main
main()
"""


def convcli(*args: str, torch: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = ["-m", "convcli"] if torch else ["-c", WITHOUT_TORCH]
    return subprocess.run([sys.executable, *command, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_converted_pair_answers_without_torch_as_the_first_load_did(
    plain_pair: tuple[Path, Path], cache: Path
) -> None:
    forward, reverse = (str(p) for p in plain_pair)
    args = ["generate", forward, "Do you like tea?", "--reverse-model", reverse, "--backend",
            "ctranslate2", "--seed", "3", "--num-candidates", "6", "--json"]  # fmt: skip
    first = convcli(*args)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr
    snapshots = list(cache.glob("*/convcli-loaded.json"))
    assert len(snapshots) == 2  # beside both conversions

    again = convcli(*args, torch=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "converting" not in again.stderr
    # Same candidates, scores and choice: the same tokenizer, metadata, config and seed.
    assert json.loads(again.stdout) == json.loads(first.stdout)

    # Chat too (its own seed handling and transcript path).
    chat = ["chat", forward, "--reverse-model", reverse, "--backend", "ctranslate2",
            "--seed", "5", "--max-new-tokens", "12"]  # fmt: skip
    turns = "Do you like tea?\nWhere do you live?\n"
    with_torch = subprocess.run([sys.executable, "-m", "convcli", *chat], input=turns,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    without = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *chat], input=turns, env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert without.returncode == 0, without.stderr[-2000:]
    assert without.stdout == with_torch.stdout and "green tea" in without.stdout


def test_a_folder_whose_files_change_is_loaded_through_transformers_again(
    plain_pair: tuple[Path, Path], cache: Path, tmp_path: Path
) -> None:
    """The snapshot belongs to the files it was taken from: a changed tokenizer file gives
    a new conversion, whose snapshot holds the new tokenizer."""
    import shutil

    from convcli.inference.model import ConversationModel

    copy = Path(shutil.copytree(plain_pair[0], tmp_path / "copy"))
    first = ConversationModel.from_pretrained(copy, backend="ctranslate2")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["pad_token"] = "ea"  # another token of the vocabulary pads now
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    heard: list[str] = []
    second = ConversationModel.from_pretrained(copy, backend="ctranslate2", report=heard.append)
    assert heard and "converting" in heard[0]
    pad = second.tokenizer.pad_token_id
    assert pad == first.tokenizer.tokenizer.get_vocab()["ea"] != first.tokenizer.pad_token_id
    third = ConversationModel.from_pretrained(copy, backend="ctranslate2")  # the snapshot
    assert type(third.tokenizer.tokenizer).__name__ == "BackendTokenizer"
    assert third.tokenizer.pad_token_id == pad


def test_a_reverse_converted_with_its_forwards_snapshot_tokenizer_records_the_real_one(
    plain_pair: tuple[Path, Path], cache: Path
) -> None:
    """The reverse folder is converted while the forward came from its snapshot: the
    reverse's snapshot still names the tokenizer class transformers loads (fingerprints
    depend on it)."""
    from convcli.inference.model import ConversationModel
    from convcli.tokenizer import load_hf_tokenizer

    ConversationModel.from_pretrained(plain_pair[0], backend="ctranslate2")  # converted
    forward = ConversationModel.from_pretrained(plain_pair[0], backend="ctranslate2")
    assert type(forward.tokenizer.tokenizer).__name__ == "BackendTokenizer"
    reverse = ConversationModel.from_pretrained(
        plain_pair[1], backend="ctranslate2", share_tokenizer=forward
    )
    assert reverse.tokenizer is forward.tokenizer
    (snapshot,) = cache.glob(f"{plain_pair[1].name}-*/convcli-loaded.json")
    recorded = json.loads(snapshot.read_text())["tokenizer"]["stands_for"]
    assert recorded == type(load_hf_tokenizer(plain_pair[1])).__name__ != "BackendTokenizer"
