"""Fixtures: a real uvicorn on 127.0.0.1 (a free port) serving the tiny trained models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="convcli serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="convcli serve needs the serve extra (fastapi, uvicorn)")

from tests.serving.server import running


@pytest.fixture(scope="session")
def plain_url(trained) -> Iterator[str]:
    """The trained forward model, no reverse model."""
    with running(trained[0], max_n=4, max_body_bytes=20_000) as url:
        yield url


@pytest.fixture(scope="session")
def mmi_url(trained) -> Iterator[str]:
    """The trained pair: replies reranked by MMI unless a request says otherwise."""
    with running(trained[0], trained[1], max_candidates=6) as url:
        yield url


@pytest.fixture
def client(plain_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{plain_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def mmi_client(mmi_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{mmi_url}/v1", api_key="unused", max_retries=0)
