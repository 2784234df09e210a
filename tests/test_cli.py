"""The CLI around the library: its reference page, version, and log levels."""
import os

import pytest

from tests.conftest import run_cli
from tf_emnist.cli.main import cli_reference

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_cli_reference_page_is_current():
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        assert f.read() == cli_reference(), "docs/cli.md is stale: run python scripts/write_cli_docs.py"


def test_every_flag_of_every_command_is_documented():
    page = cli_reference()
    for flag in ("--jit-compile", "--allow-unfinished", "--segment", "--max-batch-size", "--max-trials", "--tta",
                 "--backend", "--coordinator", "--require-xla", "--xla"):
        assert f"`{flag}" in page
    undocumented = [line for line in page.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []  # positionals (predict's IMAGE) included


def test_tasks_lines_up_each_best_preset_under_its_study_preset(capsys):
    assert run_cli("tasks") == 0
    lines = capsys.readouterr().out.splitlines()
    for study, best in zip(lines, lines[1:]):
        if best.lstrip().startswith("best:"):
            assert best.index("best:") == study.index("study:"), (study, best)


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


def test_the_library_has_no_import_cycle_and_never_imports_the_cli_or_the_tuner():
    import ast

    package = os.path.join(ROOT, "tf_emnist")
    modules = {name[:-3] for name in os.listdir(package) if name.endswith(".py") and name != "__init__.py"}
    graph = {}
    for module in modules:
        tree = ast.parse(open(os.path.join(package, module + ".py")).read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {m for m in imported if m.startswith(("tf_emnist.cli", "tf_emnist.tuning", "cli", "tuning"))}, module
        assert "tf_emnist" not in imported, module  # through a leaf module, not the package's face
        graph[module] = {m.split(".")[1] for m in imported if m.startswith("tf_emnist.")} & modules - {module}

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph[start])

    assert [m for m in sorted(modules) if reaches(m, m)] == []


@pytest.mark.slow
def test_a_wheel_installs_nothing_but_tf_emnist(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("tf_emnist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"tf_emnist"}
    assert "tf_emnist/cli/main.py" in names and "tf_emnist/tuning/search.py" in names
    assert "tf_emnist/static/index.html" in names


@pytest.mark.slow
def test_tensorflows_own_log_lines_show_only_at_debug():
    """TensorFlow's C++ lines (oneDNN's notice; on a machine without a GPU, a failed CUDA start that reads
    like an error) are no news to a user who did not ask for them."""
    import subprocess
    import sys

    from tests.conftest import shipped

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "tf_emnist.cli.main"]
    image = os.path.join(ROOT, "examples", "scan-A.png")
    quiet = subprocess.run([*command, "-q", "predict", shipped("merged"), image], capture_output=True, text=True,
                           env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.startswith(image) and quiet.stderr == "", quiet.stderr
    plain = subprocess.run([*command, "predict", shipped("merged"), image], capture_output=True, text=True,
                           env=env, timeout=300)
    assert not [line for line in plain.stderr.splitlines() if line.startswith(("I0000", "W0000", "E0000"))]
    debug = subprocess.run([*command, "--log-level", "debug", "predict", shipped("merged"), image],
                           capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 0 and debug.stdout == quiet.stdout
