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


# The server's rows (what `convcli serve` runs per batch) for a seeded MMI request.
SERVER_ROWS = """
import sys
from convcli.inference.loading import load_models
from convcli.inference.rows import MMIOptions, RowRequest, generate_rows
from convcli.inference.settings import EngineSettings, MMISettings
from pathlib import Path
forward, reranker, _ = load_models(sys.argv[1], MMISettings(reverse_model=Path(sys.argv[2])),
                                   EngineSettings(backend="ctranslate2"))
request = RowRequest(["Do you like tea?"], seed=4, mmi=MMIOptions(num_candidates=4))
(result,) = generate_rows(forward, [request], reranker)
assert result.error is None, result.error
print(result.choices[0].text, [c.score for c in result.choices[0].candidates])
print("torch imported:", "torch" in sys.modules)
"""


def convcli(*args: str, torch: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = ["-m", "convcli"] if torch else ["-c", WITHOUT_TORCH]
    return subprocess.run([sys.executable, *command, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def python(code: str, *args: str, torch: bool = True) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter (with torch and transformers unimportable if asked)."""
    refuse = WITHOUT_TORCH.split("sys.argv =")[0] if not torch else ""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", refuse + code, *args], env=env, cwd=REPO,
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

    # And the server's rows: a seeded MMI request, its choice drawn without torch.
    rows = [python(SERVER_ROWS, forward, reverse, torch=torch) for torch in (True, False)]
    assert rows[1].returncode == 0, rows[1].stderr[-2000:]
    assert rows[1].stdout.splitlines()[0] == rows[0].stdout.splitlines()[0]
    assert rows[1].stdout.splitlines()[1] == "torch imported: False"


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


def test_a_snapshot_is_kept_only_for_the_files_it_was_taken_from(
    plain_pair: tuple[Path, Path], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder changes between its loading and its conversion (a run replacing it):
    the conversion keeps no snapshot, and the next load reads the new files."""
    import shutil

    from convcli.inference import ct2_loading
    from convcli.inference.model import ConversationModel

    copy = Path(shutil.copytree(plain_pair[0], tmp_path / "copy"))
    real = ct2_loading.load_model_folder

    def then_changed(*args, **kwargs):
        loaded = real(*args, **kwargs)
        config = json.loads((copy / "tokenizer_config.json").read_text())
        (copy / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "ea"}))
        return loaded

    monkeypatch.setattr(ct2_loading, "load_model_folder", then_changed)
    first = ConversationModel.from_pretrained(copy, backend="ctranslate2")
    monkeypatch.undo()
    (converted,) = cache.iterdir()
    assert not (converted / "convcli-loaded.json").exists()
    again = ConversationModel.from_pretrained(copy, backend="ctranslate2")
    assert again.tokenizer.pad_token_id == first.tokenizer.tokenizer.get_vocab()["ea"]
    assert again.tokenizer.pad_token_id != first.tokenizer.pad_token_id


def test_a_snapshot_this_build_cannot_read_falls_back_to_transformers(
    plain_pair: tuple[Path, Path], cache: Path
) -> None:
    from convcli.inference.model import ConversationModel

    expected = ConversationModel.from_pretrained(plain_pair[0], backend="ctranslate2")
    (snapshot,) = cache.glob("*/convcli-loaded.json")
    data = json.loads(snapshot.read_text())
    backend = json.loads(data["tokenizer"]["backend_json"])
    backend["model"]["type"] = "BPE2"  # what a newer tokenizers might write
    data["tokenizer"]["backend_json"] = json.dumps(backend)
    snapshot.write_text(json.dumps(data))
    model = ConversationModel.from_pretrained(plain_pair[0], backend="ctranslate2")
    assert type(model.tokenizer.tokenizer).__name__ != "BackendTokenizer"  # transformers'
    options = {"max_new_tokens": 8, "return_token_ids": True}
    assert (
        model.generate(["Do you like tea?"], **options).token_ids
        == expected.generate(["Do you like tea?"], **options).token_ids
    )

    data["versions"]["tokenizers"] = "0.0.1"  # taken by another version: not read
    snapshot.write_text(json.dumps(data))
    model = ConversationModel.from_pretrained(plain_pair[0], backend="ctranslate2")
    assert type(model.tokenizer.tokenizer).__name__ != "BackendTokenizer"


def test_the_first_load_through_transformers_prints_only_the_conversion_line(
    plain_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    copy = Path(shutil.copytree(plain_pair[0], tmp_path / "copy"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True  # transformers warns about it for BPE
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    run = convcli("generate", str(copy), "Hello", "--backend", "ctranslate2")
    assert run.returncode == 0, run.stderr
    assert [line.split(" for ")[0] for line in run.stderr.splitlines()] == [f"converting {copy}"]
