"""nox sessions: tests, lint, bench, readme. Each installs the CPU torch pin first."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"  # the CPU wheel; an unpinned torch pulls GBs of CUDA packages


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (slow end-to-end tests included, as in CI)."""
    _install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks (all, or those named: `nox -s bench -- mmi_turn`); each prints ratios
    against a baseline run in the same process."""
    _install(session)
    chosen = set(session.posargs)
    for script in sorted(Path("benchmarks").glob("*.py")):
        if script.stem in chosen or (not chosen and script.stem != "readme_examples"):
            session.run("python", str(script))


@nox.session
def readme(session: nox.Session) -> None:
    """Run the README's examples and show where their output differs from the README
    (`nox -s readme -- --write` puts the real output in)."""
    _install(session)
    session.run("python", "benchmarks/readme_examples.py", *session.posargs)
