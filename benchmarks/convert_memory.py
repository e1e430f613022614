"""Peak memory and time of `convert` against a bare torch.load + safetensors save.

A DialoGPT-layout fp16 checkpoint at the 345M shape (24 layers, width 1024, random
weights, lm_head.decoder copy and causal-mask buffers, like medium_ft.pkl) is written
to a temp dir. Each job runs in its own subprocess, which first imports what any job
may need (torch, transformers' GPT-2 model and tokenizer classes: the figure is shown
as "imports s", paid once per command by the CLI, whatever the file's size) and then
reports its peak RSS (VmHWM, reset after the imports) and wall time:

    baseline          torch.load(weights_only=True) + safetensors.save_file, as stored
    baseline:float32  the same with every tensor cast to float32 first (`.float()`): the
                      bare way to write the bytes a float32 folder holds
    convert ...       convert_checkpoint with the given dtype, with/without verification
                      (float32 is the default; float16 writes the baseline's bytes,
                      float32 twice them)

The jobs run interleaved `--repeats` times; the table shows medians (time ratios are
against the baseline's median), then verified / unverified time per dtype.
Torch threads are the command's (`default_threads()`).
Usage: python benchmarks/convert_memory.py [--format legacy|zip] [--layers 24] [--quick]
[--repeats 3] (`legacy` is the pre-zip torch.save format of the released .pkl files;
`--quick` skips the verified runs.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT2_VOCAB = REPO.parent / "shared" / "gpt2-tokenizer"


def write_checkpoint(path: Path, *, layers: int, width: int, legacy: bool) -> None:
    import torch

    vocab, positions = 50257, 1024
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).half()

    state = {
        "transformer.wte.weight": rand(vocab, width),
        "transformer.wpe.weight": rand(positions, width),
    }
    mask = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions).half()
    for i in range(layers):
        p = f"transformer.h.{i}."
        state |= {
            p + "ln_1.weight": torch.ones(width).half(),
            p + "ln_1.bias": torch.zeros(width).half(),
            p + "attn.bias": mask.clone(),
            p + "attn.c_attn.weight": rand(width, 3 * width),
            p + "attn.c_attn.bias": rand(3 * width),
            p + "attn.c_proj.weight": rand(width, width),
            p + "attn.c_proj.bias": rand(width),
            p + "ln_2.weight": torch.ones(width).half(),
            p + "ln_2.bias": torch.zeros(width).half(),
            p + "mlp.c_fc.weight": rand(width, 4 * width),
            p + "mlp.c_fc.bias": rand(4 * width),
            p + "mlp.c_proj.weight": rand(4 * width, width),
            p + "mlp.c_proj.bias": rand(width),
        }
    state |= {
        "transformer.ln_f.weight": torch.ones(width).half(),
        "transformer.ln_f.bias": torch.zeros(width).half(),
        "lm_head.decoder.weight": state["transformer.wte.weight"].clone(),
    }
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def child(job: str, checkpoint: Path, out: Path, tokenizer: str) -> None:
    """Run one job in this (fresh) process and print its figures as JSON."""
    began = time.perf_counter()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: F401

    from convcli.conversion.convert import convert_checkpoint
    from convcli.inference.loading import set_threads

    imports = time.perf_counter() - began  # every job pays for the same imports

    set_threads(None)  # as the convert command does
    # Count only the job: reset the peak (VmHWM) after the imports where Linux allows it.
    peak_reset = _reset_peak()
    start_mb = _status_mb("VmRSS")
    start = time.perf_counter()
    if job.startswith("baseline"):
        dtype = torch.float32 if job == "baseline:float32" else None
        with checkpoint.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=is_zip)
        cast = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}
        save_file(cast, str(out))
    else:
        _, dtype, verify = job.split(":")
        convert_checkpoint(
            checkpoint, out, tokenizer=tokenizer, dtype=dtype, verify=verify == "verify"
        )
    seconds = time.perf_counter() - start
    if peak_reset:
        peak = _status_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"seconds": seconds, "peak_mb": peak, "start_mb": start_mb, "imports": imports})
    )


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB (0 if unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(job: str, checkpoint: Path, out: Path, tokenizer: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", job, str(checkpoint), str(out), tokenizer]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode:
        sys.exit(f"{job} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=["legacy", "zip"], default="legacy")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="skip the verified conversions")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each job")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job, checkpoint, out, tokenizer = args.child
        child(job, Path(checkpoint), Path(out), tokenizer)
        return

    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        tmp_path = Path(tmp)
        tokenizer = (
            str(GPT2_VOCAB) if (GPT2_VOCAB / "vocab.json").is_file() else _tiny_vocab(tmp_path)
        )
        checkpoint = tmp_path / "medium_ft.pkl"
        write_checkpoint(
            checkpoint, layers=args.layers, width=args.width, legacy=args.format == "legacy"
        )
        size_mb = checkpoint.stat().st_size / 1e6 / 1.048576  # MiB, like ru_maxrss
        print(
            f"checkpoint: {args.layers} layers, width {args.width}, fp16, "
            f"{args.format} format, {size_mb:.0f} MiB"
        )
        jobs = ["baseline", "baseline:float32", "convert:float32:no-verify"]
        jobs += ["convert:float16:no-verify"]
        if not args.quick:
            jobs += ["convert:float32:verify", "convert:float16:verify"]
        runs: dict[str, list[dict[str, float]]] = {job: [] for job in jobs}
        for r in range(args.repeats):
            for i, job in enumerate(jobs):
                out = tmp_path / f"out{i}-{r}"
                runs[job].append(run(job, checkpoint, out, tokenizer))
                _remove(out)
        results = {
            job: {key: statistics.median(x[key] for x in values) for key in values[0]}
            for job, values in runs.items()
        }
        base = results["baseline"]
        print(
            f"{'job':<28}{'peak MiB':>10}{'above start':>13}{'x file':>8}"
            f"{'x base mem':>12}{'seconds':>9}{'x base time':>13}{'imports s':>11}"
        )
        for job, r in results.items():
            above = r["peak_mb"] - r["start_mb"]
            print(
                f"{job:<28}{r['peak_mb']:>10.0f}{above:>13.0f}{above / size_mb:>8.2f}"
                f"{above / (base['peak_mb'] - base['start_mb']):>12.2f}"
                f"{r['seconds']:>9.2f}{r['seconds'] / base['seconds']:>13.2f}{r['imports']:>11.2f}"
            )
        for dtype in ("float32", "float16"):
            verified = results.get(f"convert:{dtype}:verify")
            if verified:
                plain = results[f"convert:{dtype}:no-verify"]
                bare = results["baseline:float32"] if dtype == "float32" else base
                print(
                    f"{dtype}{' (default)' if dtype == 'float32' else ''}: verified "
                    f"{verified['seconds'] / base['seconds']:.2f}x the baseline, unverified "
                    f"{plain['seconds'] / base['seconds']:.2f}x; verified / unverified "
                    f"{verified['seconds'] / plain['seconds']:.2f}; against a bare load + "
                    f"save of the same output bytes: verified "
                    f"{verified['seconds'] / bare['seconds']:.2f}x, unverified "
                    f"{plain['seconds'] / bare['seconds']:.2f}x"
                )
        spread = {job: [round(x["seconds"], 1) for x in values] for job, values in runs.items()}
        print(f"seconds of each repeat: {spread}")


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _tiny_vocab(tmp: Path) -> str:
    """Without ../shared, any tokenizer smaller than GPT-2's vocabulary will do."""
    sys.path.insert(0, str(REPO))
    from convcli.data.vocab import train_bpe_tokenizer

    train_bpe_tokenizer(
        ["hello there", "how are you"], vocab_size=300, min_frequency=1
    ).save_pretrained(str(tmp / "vocab"))
    return str(tmp / "vocab")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
