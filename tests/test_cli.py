"""The CLI around the library: its reference page, version, and log levels."""
import os

from tests.conftest import run_cli
from tf_emnist.cli.main import cli_reference

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_cli_reference_page_is_current():
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        assert f.read() == cli_reference(), "docs/cli.md is stale: run python scripts/write_cli_docs.py"


def test_every_flag_of_every_command_is_documented():
    page = cli_reference()
    for flag in ("--jit-compile", "--allow-unfinished", "--segment", "--max-batch-size", "--max-trials", "--tta"):
        assert f"`{flag}" in page


def test_version_and_tasks_start_without_the_unix_only_resource_module(capsys):
    import subprocess
    import sys

    # A stand-in `resource` that cannot be imported, as on Windows.
    code = ("import sys; sys.modules['resource'] = None\n"
            "from tf_emnist.cli.main import main\n"
            "assert main(['tasks']) == 0\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged" in done.stdout
    assert run_cli("--version") == 0
    from tf_emnist import __version__

    assert capsys.readouterr().out.strip() == f"tf-emnist {__version__}"
