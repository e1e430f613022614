"""Fixtures of the ctranslate2 backend's tests (test_ct2_engine, test_ct2_loading)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DIALOGUES, train_tiny


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Converted models go to a test folder, never to the user's cache."""
    monkeypatch.setenv("CONVCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ctranslate2"


@pytest.fixture(scope="session")
def plain_pair(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> tuple[Path, Path]:
    """A forward and a reverse model trained without token types (what CTranslate2 runs)."""
    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer
    from tests.conftest import reverse_pairs

    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    unique = [list(d) for d in dict.fromkeys(tuple(d) for d in DIALOGUES)]
    root = tmp_path_factory.mktemp("ct2-pair")
    sep = tokenizer.sep_token_id
    forward = train_tiny(tokenizer, unique, token_types=False, steps=150)
    reverse = train_tiny(tokenizer, reverse_pairs(unique), token_types=False, steps=150)
    return (
        save_model_folder(forward, tokenizer, ModelMeta(False, sep), root / "forward"),
        save_model_folder(reverse, tokenizer, ModelMeta(False, sep, reverse=True), root / "rev"),
    )
