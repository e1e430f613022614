"""`convcli serve` from the command line: options, config, a real process answering."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.conftest import REPO, run_cli
from tests.serving.server import free_port


def test_print_config_has_the_serve_settings(tmp_path):
    out = run_cli("serve", "some-model", "--port", "9123", "--threads", "2", "--print-config")
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["host"] == "127.0.0.1"  # this machine only, unless told otherwise
    assert (config["port"], config["threads"]) == (9123, 2)
    assert config["top_p"] == 0.95 and config["num_candidates"] == 8
    path = tmp_path / "serve.yaml"
    path.write_text(out.stdout)
    again = run_cli("serve", "m", "--config", str(path), "--max-n", "3", "--print-config")
    assert yaml.safe_load(again.stdout) == {**config, "max_n": 3}


def test_bad_values_name_the_flag():
    out = run_cli("serve", "m", "--workers", "0")
    assert out.returncode == 2
    assert "--workers must be at least 1" in out.stderr


def test_missing_extra_is_a_one_line_install_hint(tmp_path):
    # A fastapi that cannot be imported, as in an install without the serve extra.
    (tmp_path / "fastapi.py").write_text("raise ImportError('no fastapi here')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-m", "convcli", "serve", "m"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: convcli serve needs FastAPI and uvicorn: pip install 'convcli[serve]'"
    ]


def test_what_cannot_load_is_refused_before_the_server_listens(tmp_path):
    port = str(free_port())
    out = run_cli("serve", str(tmp_path / "nowhere"), "--port", port, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"error: model folder not found: {tmp_path / 'nowhere'}"]
    if importlib.util.find_spec("ctranslate2") is not None:  # a compute type this CPU lacks
        out = run_cli("serve", str(tmp_path), "--port", port, "--backend", "ctranslate2",
                      "--compute-type", "float16", timeout=120)  # fmt: skip
        assert out.returncode == 2
        assert out.stderr.splitlines() == [
            "error: --compute-type float16 does not run on this CPU: choose one of int8, "
            "int8_float32, float32"
        ]


def test_a_model_that_does_not_load_stops_the_server(tmp_path):
    # A folder that passes the checks made before listening but fails to load.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    out = run_cli("serve", str(folder), "--port", str(free_port()), timeout=120)
    assert out.returncode == 1
    assert "error:" in out.stderr and str(folder) in out.stderr.splitlines()[-1]


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`python -m convcli serve ARGS --port P` in a subprocess; (process, URL) once healthy."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "convcli", "serve", *args, "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.communicate()[1]}")
        time.sleep(0.1)


def hello(url: str, *, wait_for_loading: float = 0) -> str:
    """The greedy reply to "Hello"; a worker still loading its model answers 503, and with
    `wait_for_loading` seconds we ask again (as a load balancer would)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0, "mmi": False}  # fmt: skip
    deadline = time.monotonic() + wait_for_loading
    while True:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        if reply.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_serve_answers_over_http_and_stops_on_ctrl_c(trained):
    proc, url = start(str(trained[0]), "--reverse-model", str(trained[1]), "--model-name", "tiny")
    try:
        assert hello(url) == "Hi, how are you?"
        assert "convcli chat" in httpx.get(f"{url}/").text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the Ctrl-C: exit 130, as for uvicorn itself.
    assert proc.returncode == 130, err
    assert "Finished server process" in err
    assert "as 'tiny' (MMI over 8 candidates); chat page: http://127.0.0.1:" in err


@pytest.mark.slow
def test_workers_each_serve_the_model(trained):
    proc, url = start(str(trained[0]), "--model-name", "tiny", "--workers", "2")
    try:
        # /health answered by one worker says nothing of the other, which may still be loading.
        assert [hello(url, wait_for_loading=60) for _ in range(4)] == ["Hi, how are you?"] * 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "starting 2 workers" in err
    assert err.count("Started server process") == 2
