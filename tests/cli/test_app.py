from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from convcli import __version__
from convcli.cli.app import app
from tests.conftest import REPO, run_cli

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"convcli {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from convcli.cli.app import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'pytorch_lightning', 'lightning')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_works():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"convcli {__version__}"
