from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from convcli.cli.app import app
from tests.conftest import run_cli

runner = CliRunner()
FAST = ["--batch-size", "4", "--accelerator", "cpu", "--devices", "1", "--warmup-steps", "1"]


def invoke(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


def test_print_config_round_trips_and_flags_beat_the_file(tmp_path):
    first = invoke("--print-config", "--lr", "0.003", "--reverse", "--train-on", "all")
    assert first.exit_code == 0 and first.stderr == ""
    config = yaml.safe_load(first.stdout)
    assert config["learning_rate"] == 0.003 and config["reverse"] is True
    assert "# Token budget of a batch per device" in first.stdout  # commented
    path = tmp_path / "train.yaml"
    path.write_text(first.stdout)
    again = invoke("--config", path, "--print-config")
    assert again.stdout == first.stdout
    override = yaml.safe_load(invoke("--config", path, "--lr", "0.5", "--print-config").stdout)
    assert override["learning_rate"] == 0.5 and override["train_on"] == "all"


def test_bad_config_value_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("precision: 64\n")
    one_line_error(invoke("--config", path, "--print-config"), 2, "precision")


@pytest.mark.parametrize(
    ("build", "args", "code", "message"),
    [
        ("missing", [], 1, "shard directory not found"),
        ("foreign", [], 1, "not a shard directory"),
        ("mismatch", [], 1, "manifest does not match its files"),
        ("no-train", [], 1, "the training split is empty"),
        ("ok", ["--resume", "auto"], 1, "nothing to resume"),
        ("ok", ["--resume", "nope.ckpt"], 1, "checkpoint not found"),
        ("no-model", ["--preset", "huge"], 2, "--preset: 'huge' is not one of tiny"),
        ("no-model", [], 2, "exactly one of --model"),
        ("ok", ["--train-on", "most"], 2, "--train-on: 'most' is not one of"),
        ("ok", ["--accumulate", "0"], 2, "--accumulate must be at least 1"),
        ("ok", ["--reverse", "--train-on", "weights"], 2, "--reverse cannot use --train-on"),
    ],
)
def test_bad_input_is_one_line(build, args, code, message, make_shards, tiny_model_dir, tmp_path):
    data = tmp_path / "missing"
    if build == "foreign":
        data.mkdir()
        (data / "notes.txt").write_text("hi")
    elif build == "mismatch":
        data = make_shards()
        file = data / "train-00000.ids.bin"
        file.write_bytes(file.read_bytes()[:-2])
    elif build == "no-train":
        data = make_shards(valid_every=1)
    elif build in ("ok", "no-model"):
        data = make_shards()
    model = [] if build == "no-model" else ["--model", tiny_model_dir]
    options = ["--data", data, "--output", tmp_path / "run", *model, *args]
    one_line_error(invoke(*options), code, message)


@pytest.mark.slow
def test_train_summary_refuses_a_second_run_and_resumes(make_shards, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    base = ["--data", make_shards(), "--output", run, "--model", tiny_model_dir, *FAST]
    first = invoke(*base, "--max-steps", "2", "--reverse")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == ""  # model text only on stdout; training prints none
    summary = next(line for line in first.stderr.splitlines() if line.startswith("trained "))
    assert summary.startswith("trained 2 steps on ") and f"final: {run / 'final'}" in summary
    assert "val loss" in summary and "ppl" in summary
    assert json.loads((run / "final" / "convcli.json").read_text())["reverse"] is True

    one_line_error(invoke(*base, "--max-steps", "2"), 1, "already holds a run")
    # Options that fix the data order, the loss or the restored optimizer must not change.
    resume = [*base, "--max-steps", "4", "--resume", "auto"]
    one_line_error(invoke(*resume), 1, "trained with --reverse True (now False)")
    one_line_error(invoke(*resume, "--reverse", "--lr", "0.5"), 1, "--learning-rate default")
    one_line_error(invoke(*resume, "--reverse", "--batch-size", "3"), 1, "--batch-size 4 (now 3)")
    resumed = invoke(*base, "--max-steps", "4", "--reverse", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "trained 4 steps" in resumed.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(make_shards, tiny_model_dir, tmp_path):
    run, data = tmp_path / "ddp", make_shards()
    result = run_cli(
        "train", "--data", str(data), "--output", str(run),
        "--model", str(tiny_model_dir), "--max-steps", "3", "--batch-size", "2",
        "--val-every", "2", "--strategy", "ddp", "--devices", "2", "--accelerator", "cpu",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stderr.splitlines() if line.startswith("trained ")]
    assert len(summaries) == 1 and summaries[0].startswith("trained 3 steps")  # rank 0 only
    assert (run / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003.ckpt"]
    # Its data position counts two ranks' batches: one process cannot continue it.
    resumed = invoke("--data", data, "--output", run, "--model", tiny_model_dir, "--max-steps",
                     "4", "--batch-size", "2", "--accelerator", "cpu", "--devices", "1",
                     "--resume", "auto")  # fmt: skip
    assert resumed.exit_code == 1  # found at load time, after the "training ..." line
    assert resumed.stderr.strip().splitlines()[-1].startswith("error: --resume: the checkpoint")
    assert "written by 2 processes, this run has 1" in resumed.stderr


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_end_with_the_weights_of_one_node_with_two_processes(
    make_shards, tiny_model_dir, tmp_path
):
    # What a cluster launcher (SLURM, torchrun) gives each machine: where rank 0 listens,
    # this machine's rank, the number of processes. Here two "nodes" of one process each.
    import torch
    from safetensors.torch import load_file

    from tests.conftest import REPO

    data = make_shards()
    common = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--max-steps", "3",
              "--batch-size", "2", "--val-every", "2", "--strategy", "ddp", "--accelerator",
              "cpu", "--threads", "1", "-q"]  # fmt: skip
    port = str(free_port())
    nodes = []
    for rank in ("0", "1"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NODE_RANK": rank, "WORLD_SIZE": "2"}  # fmt: skip
        args = [*common, "--output", str(tmp_path / "nodes"), "--num-nodes", "2", "--devices", "1"]
        command = [sys.executable, "-m", "convcli", *args]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        nodes.append(subprocess.Popen(command, env=env, cwd=REPO, **pipes))
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # no-op when it has ended; a hung rendezvous must not outlive the test
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][1].count("trained 3 steps") == 1 and "trained" not in outputs[1][1]
    checkpoint = torch.load(tmp_path / "nodes" / "checkpoints" / "step-0000003.ckpt",
                            weights_only=False)  # fmt: skip
    assert checkpoint["convcli"]["world_size"] == 2

    one = run_cli(*common, "--output", str(tmp_path / "one"), "--devices", "2", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "nodes" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        a["transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"]
    )


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_exports_the_gathered_weights(make_shards, tmp_path):
    # Lightning refuses `--strategy fsdp` on CPU; fsdp_cpu.py adapts only what CPU needs.
    import torch
    from safetensors.torch import load_file

    from convcli.conversion.convert import convert_checkpoint
    from tests.conftest import REPO

    run = tmp_path / "fsdp"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "training" / "fsdp_cpu.py"), "train",
         "--data", str(make_shards()), "--output", str(run), "--preset", "tiny",
         "--max-steps", "4", "--batch-size", "2", "--val-every", "2", "--save-every", "4",
         "--strategy", "fsdp_cpu", "--devices", "2", "--accelerator", "cpu"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("trained 4 steps")]

    ckpt = torch.load(run / "checkpoints" / "step-0000004.ckpt", weights_only=True)
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    final = load_file(str(run / "final" / "model.safetensors"))
    assert set(final) == set(saved) - {"lm_head.weight"}  # tied to wte
    for key, tensor in final.items():
        assert torch.equal(tensor, saved[key]), key
    assert load_file(str(run / "best" / "model.safetensors")).keys() == final.keys()

    # Weight decay on the 2-D weights only, decided before FSDP flattened them.
    decay, no_decay = ckpt["optimizer_states"][0]["param_groups"]
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert len(decay["params"]) == sum(t.ndim == 2 for t in final.values())
    assert len(no_decay["params"]) == sum(t.ndim == 1 for t in final.values())

    convert_checkpoint(run / "checkpoints" / "step-0000004.ckpt", tmp_path / "converted")
    converted = load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert all(torch.equal(converted[k], final[k]) for k in final)


def test_summary_says_where_validation_stopped_improving(tmp_path):
    from convcli.cli.train import summary
    from convcli.training.fit import TrainResult

    common = dict(output=tmp_path, tokens=1000, seconds=2.0, val_loss=5.27,
                  final=tmp_path / "final", best=tmp_path / "best", padding=0.1,
                  is_global_zero=True, best_step=200, best_val_loss=3.1)  # fmt: skip
    overfit = summary(TrainResult(steps=800, worse_since_best=6, **common))
    assert overfit[0].startswith("trained 800 steps") and "val loss 5.2700" in overfit[0]
    assert "stopped improving at step 200 (the 6 validations since were worse" in overfit[1]
    assert "holds step 200" in overfit[1] and "--early-stop" in overfit[1]
    early = summary(TrainResult(steps=260, worse_since_best=3, stopped_early=True, **common))
    assert early[1].startswith("stopped early at step 260: the validation loss had not improved")
    fine = summary(TrainResult(steps=200, **common))
    assert fine[1] == f"best: {tmp_path / 'best'} holds step 200 (val loss 3.1000)"


@pytest.mark.slow
def test_early_stop_is_reported_with_the_step_best_holds(make_shards, tmp_path):
    from tests.training.test_fit import overfitting_shards

    run = tmp_path / "run"
    options = ["--preset", "tiny", "--batch-size", "4", "--max-steps", "60", "--val-every", "5",
               "--early-stop", "2", "--accelerator", "cpu", "--devices", "1", "-q"]  # fmt: skip
    result = invoke("-d", overfitting_shards(make_shards), "-o", run, *options)
    assert result.exit_code == 0, result.stderr
    stopped = [line for line in result.stderr.splitlines() if line.startswith("stopped early")]
    assert len(stopped) == 1, result.stderr
    step, best = map(int, re.findall(r"step (\d+)", stopped[0])[:2])
    assert step == best + 10 < 60 and f"holds step {best} " in stopped[0]
    assert json.loads((run / "best" / "convcli.json").read_text())["extra"]["step"] == best
    assert "tokens per parameter" in result.stderr and "--model gpt2" in result.stderr

    # Resumed without --early-stop: Lightning's "callbacks used to create the checkpoint"
    # hint about the dropped callback is not shown.
    import warnings

    more = [*options[:5], str(step + 5), *options[6:8], "--accelerator", "cpu", "--devices", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = invoke("-d", run.parent / "shards", "-o", run, *more, "--resume", "auto", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"trained {step + 5} steps" in resumed.stderr
    assert not [w for w in caught if "callbacks used to create" in str(w.message)]
