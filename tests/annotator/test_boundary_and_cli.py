"""The install boundary (the annotator is the base install), its module boundaries, and the CLI's help."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import annotator
from annotator.cli import app

FORBIDDEN = ("dagster", "torch", "fastapi", "sqlalchemy", "kombinat_api", "embedkomb_pipeline")
PACKAGE_DIR = Path(annotator.__file__).parent


@pytest.mark.subprocess
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


def annotator_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) for every ``from annotator... import name`` inside the package."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "annotator":
                found += [(path.relative_to(PACKAGE_DIR).as_posix(), node.module or "", a.name) for a in node.names]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    private = [item for item in annotator_imports() if item[2].startswith("_") and not item[2].startswith("__")]
    assert private == []


def test_backends_share_code_only_through_base() -> None:
    siblings = [
        (file, module)
        for file, module, _ in annotator_imports()
        if file.startswith("backends/") and file != "backends/__init__.py"
        and module.startswith("annotator.backends.") and module != "annotator.backends.base"
    ]  # fmt: skip
    assert siblings == []


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
    assert result.exit_code == 0 and result.output.strip() == f"{annotator.__version__} (prompt versions: p1, g1, r1)"


def test_reporters_render_progress_json_and_quiet() -> None:
    import io

    from rich.console import Console

    from annotator.report import JsonReporter, Reporter, RichReporter, Totals

    buf = io.StringIO()
    rich = RichReporter(Console(file=buf, width=160, force_terminal=False))
    totals = Totals(labeled=1, accepted=0)
    rich.start({"server": "http://k", "login": "alice", "backend": "llama_cpp", "model_id": "m", "quantization": "q"})
    rich.batch("abcdef0123", 2)
    rich.pair(totals, 0.7)
    totals.labeled, totals.accepted = 2, 2
    rich.pair(totals, 0.2)
    rich.submitted("abcdef0123", 2, 2, 0)
    rich.warn("pip install 'embedkomb[gpu]'")  # brackets must survive rich markup
    rich.finish(totals, "done")
    text = buf.getvalue()
    assert "alice" in text and "2/2" in text and "accepted 2" in text and "embedkomb[gpu]" in text

    out = io.StringIO()
    js = JsonReporter(out=out)
    js.batch("b", 3)
    js.retry(1, 0.5, "ConnectError")
    js.finish(totals, "done")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["batch", "retry", "finish"]
    assert events[-1]["labeled"] == 2 and events[-1]["accepted"] == 2

    err = io.StringIO()
    quiet = Reporter(err=err)
    quiet.batch("b", 3)
    quiet.pair(totals, 0.5)
    quiet.finish(totals, "done")
    assert err.getvalue() == ""
    quiet.warn("careful")
    assert "careful" in err.getvalue()
