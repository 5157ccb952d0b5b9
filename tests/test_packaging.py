"""environment.yml and pyproject.toml describe the same install; README's commands are the ones CI runs."""

import re
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
    assert named == set(extras) - {"all"}, "the 'all' extra must name every other extra"


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
