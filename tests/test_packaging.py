"""environment.yml and pyproject.toml describe the same install; README's commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_installs_every_extra():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["--editable .[all]"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(","))
    # "bench" holds the benchmarks' peers only (llama-cpp-python compiles llama.cpp for minutes): not for CI
    assert named == set(extras) - {"all", "bench"}, "the 'all' extra must name every other extra but 'bench'"
    assert {"torchao", "llama-cpp-python", "gguf"} <= {re.split(r"[<>=\[ ]", d)[0] for d in extras["bench"]}


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest tests notebooks --nbval-lax"
    assert command in readme and command in ci
    assert 'pip install --editable ".[all]"' in readme


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert notebook.name in readme, notebook.name


def test_cli_builds_its_parser_without_tomllib_and_without_the_server_stack():
    """pyproject admits Python 3.10, which has no tomllib (tomli stands in), and `dsv3 --help` of any command must
    not import the server's libraries (fastapi, uvicorn, pydantic) to build the parser."""
    code = ("import sys; sys.modules['tomllib'] = None\n"
            "from dsv3.cli import build_parser\n"
            "build_parser()\n"
            "from dsv3.server.cli import tomllib\n"
            "assert tomllib.__name__ == 'tomli', tomllib\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'pydantic', 'starlette') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
