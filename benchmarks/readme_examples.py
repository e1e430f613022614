"""Run every example in README.md and compare what it prints with what the README shows.

    python benchmarks/readme_examples.py            # report: same / differs (with a diff) / skipped
    python benchmarks/readme_examples.py --write    # also put the real output into the README

Each ```console block is a session: `$ COMMAND` lines are run in order in a scratch folder
(runs/readme-check/, emptied first, which sees the repository's sample_data/ and convcli/;
the demo comes first, so later examples find its models in runs/demo/ there).
`$ cat FILE` shows an input: the README's lines are written to FILE first. The
lines after each command are its expected output. What no two runs share is masked before
comparing: times, rates, and tqdm progress frames. A `...` line in the README stands for
lines left out, and a block with one is compared but never rewritten. Chat examples are fed
the `you>` lines on stdin and compared on the `bot>` lines (piped chat prints replies only).
An example whose input files are not here (e.g. DialoGPT's .pkl files) is skipped, saying so.
Not a test (the demo alone takes one to two minutes): a check to run before editing figures.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
WORK = REPO / "runs" / "readme-check"
OUTPUT_FLAGS = {"-o", "--output", "--transcript"}
# On a terminal, progress is a bar that leaves no line; in a log it is a `step ...` line every
# few seconds, at steps that depend on the machine's speed: such lines match any such line.
PROGRESS = re.compile(r"^step \d+/\d+ \(")
# Times, rates and progress bars differ on every run.
MASKS = [
    (re.compile(r"\d+(\.\d+)?(\s?(s|ms|it/s|tokens/s))\b"), r"<t>\2"),
    (re.compile(r"\b\d\d:\d\d\b"), "<clock>"),
]


@dataclass
class Example:
    command: str
    expected: list[str]
    start: int  # line numbers in README.md of the expected output: [start, end)
    end: int
    elided: bool = False
    stdin: list[str] = field(default_factory=list)


def examples(text: str) -> list[Example]:
    lines = text.splitlines()
    found: list[Example] = []
    in_console = False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            in_console = line.strip() == "```console" and not in_console
            continue
        if not in_console:
            continue
        if line.startswith("$ "):
            found.append(Example(line[2:], [], number + 1, number + 1))
        elif found and found[-1].end == number:
            example = found[-1]
            example.expected.append(line)
            example.end = number + 1
            example.elided |= line.strip() == "..."
    for example in found:
        if example.command.startswith("convcli chat"):
            example.stdin = [e[5:] for e in example.expected if e.startswith("you> ")]
            example.expected = [e[5:] for e in example.expected if e.startswith("bot> ")]
            example.elided = True  # the typed lines are the README's, never rewritten
    return found


def mask(line: str) -> str:
    for pattern, repl in MASKS:
        line = pattern.sub(repl, line)
    return line.rstrip()


def run(example: Example, timeout: float) -> tuple[list[str], float] | str:
    """(the output lines, seconds), or why it was not run."""
    words = shlex.split(example.command, posix=True)
    redirect = stream = None
    for op in (">", "2>"):
        if op in words:
            at = words.index(op)
            words, redirect, stream = words[:at], words[at + 1], op
    if words[0] == "cat" and not (WORK / words[1]).exists():
        (WORK / words[1]).write_text("".join(f"{e}\n" for e in example.expected), "utf-8")
    outputs = {b for a, b in itertools.pairwise(words) if a in OUTPUT_FLAGS}
    missing = [
        w for w in words[1:]
        if _looks_like_input(w) and w not in outputs and not (WORK / w).exists()
    ]  # fmt: skip
    if missing:
        return f"needs {', '.join(missing)}"
    env = {**os.environ, "COLUMNS": "100"}
    if words[0] == "convcli":
        words = [sys.executable, "-m", "convcli", *words[1:]]
    # One stream, as a terminal shows it, unless the example splits them.
    merged = redirect is None and not example.stdin
    started = time.perf_counter()
    done = subprocess.run(
        words, cwd=WORK, env=env, text=True, timeout=timeout, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        input="".join(f"{s}\n" for s in example.stdin) + ("/quit\n" if example.stdin else ""),
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    out = done.stdout  # with stdin: piped chat prints the replies only, one per line
    if redirect:
        saved, out = (done.stdout, done.stderr) if stream == ">" else (done.stderr, done.stdout)
        (WORK / redirect).write_text(saved, encoding="utf-8")
    lines = out.replace(f"{WORK}/", "").splitlines()
    if words[0] != "cat":  # a command's own progress lines: a terminal shows a bar instead
        lines = [line for line in lines if not PROGRESS.match(line)]
    return [line for line in lines if "\r" not in line], elapsed


def _clean() -> None:
    """A fresh scratch folder for each check: outputs would refuse to be replaced, and the
    demo must run from the start to print what a first run prints."""
    import shutil

    for child in WORK.iterdir():
        if child.is_symlink() or not child.is_dir():
            child.unlink()
        else:
            shutil.rmtree(child)


def _looks_like_input(word: str) -> bool:
    return bool(re.search(r"\.(pkl|jsonl|tsv|txt|ckpt)$", word)) and not word.startswith("-")


def matches(expected: list[str], actual: list[str], elided: bool) -> bool:
    want = [mask(line) for line in expected if line.strip() != "..."]
    got = [mask(line) for line in actual]
    if len(want) == len(got):  # progress lines of a log shown with cat
        pairs = zip(want, got, strict=True)
        got = [w if PROGRESS.match(w) and PROGRESS.match(g) else g for w, g in pairs]
    if not elided:
        return want == got
    it = iter(got)
    return all(any(line == g for g in it) for line in want)  # in order, gaps allowed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the real output into README")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = examples(text)
    differ = 0
    WORK.mkdir(parents=True, exist_ok=True)
    _clean()
    for shared in ("sample_data", "convcli"):
        if not (WORK / shared).exists():
            (WORK / shared).symlink_to(REPO / shared)
    for example in found:
        result = run(example, args.timeout)
        if isinstance(result, str):
            print(f"skipped  {example.command}\n         ({result})")
            continue
        actual, seconds = result
        if matches(example.expected, actual, example.elided):
            print(f"same     {example.command}  ({seconds:.1f} s)")
            continue
        differ += 1
        print(f"DIFFERS  {example.command}  ({seconds:.1f} s)")
        diff = difflib.unified_diff(example.expected, actual, "README", "now", lineterm="")
        print("\n".join(f"         {d}" for d in diff))
        if args.write and not example.elided:
            lines[example.start : example.end] = actual
            # Later examples' line numbers shift by the change in length.
            shift = len(actual) - (example.end - example.start)
            for later in found[found.index(example) + 1 :]:
                later.start += shift
                later.end += shift
    if args.write:
        README.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(found)} example(s), {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
