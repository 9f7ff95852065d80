"""The install boundary (the annotator is the base install) and the CLI's help."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from typer.testing import CliRunner

import annotator
from annotator.cli import app

FORBIDDEN = ("dagster", "torch", "fastapi", "sqlmodel", "kombinat_api", "embedkomb_pipeline")


def test_no_annotator_module_imports_the_server_or_pipeline_stack() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(annotator.__path__, "annotator."))
    assert "annotator.backends.vllm" in modules and "annotator.cli" in modules
    modules = [m for m in modules if m != "annotator.__main__"]  # running it would start the CLI
    code = f"""
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print(json.dumps(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    # Backend libraries load only when a backend is constructed.
    check = "import annotator.backends.vllm, annotator.backends.mlx, sys; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "False"


def test_help_explains_every_command() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("login", "logout", "whoami", "doctor", "run", "bench"):
        assert command in result.output
    assert "Privacy" in result.output
    run_help = runner.invoke(app, ["run", "--help"])
    assert run_help.exit_code == 0
    options = ("--server", "--backend", "--model", "--model-path", "--batch-size", "--max-pairs", "--once")
    for option in (*options, "--json", "--quiet"):
        assert option in run_help.output


def test_run_without_login_says_how_to_log_in() -> None:
    result = CliRunner().invoke(app, ["run", "--server", "http://127.0.0.1:9", "--once"])
    assert result.exit_code == 3
    assert "annotator login" in result.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"{annotator.__version__}+p1"
