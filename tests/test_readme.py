"""README's command table, run as printed: every command exits 0.

Each runs as `python -m dsv3 ...` (the `dsv3` entry point, this checkout first on the path) in a temporary
directory that links the repository's `data/`, `scripts/` and `dsv3/`, so README's relative paths hold and what the
commands write (runs/...) lands in the temporary directory. The only additions: `dsv3 serve` gets a free --port
(8000 may be taken) and is stopped with SIGINT once /health answers; `dsv3 chat` reads a prompt and /exit on stdin.
They run two at a time, one torch thread each (tests/test_cli.py's dsv3_env).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_cli import ROOT, dsv3_env


def readme_commands() -> list[str]:
    """The first code span of each row of the table under README's "## Command line"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(dsv3 [^`]+)` \|", section, flags=re.MULTILINE)


COMMANDS = readme_commands()


def test_the_table_covers_every_subcommand():
    from dsv3.cli import build_parser

    [subcommands] = [a for a in build_parser()._actions if a.dest == "command"]
    assert sorted(c.split()[1] for c in COMMANDS) == sorted(subcommands.choices)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for name in ("data", "scripts", "dsv3"):
        (work / name).symlink_to(ROOT / name)
    return work


def _argv(command: str) -> list[str]:
    return [sys.executable, "-m", "dsv3", *shlex.split(command)[1:]]


def _serve(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Start it on a free port, wait for /health, stop it with Ctrl-C (SIGINT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*_argv(command), "--port", str(port)], cwd=cwd, env=dsv3_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, healthy = time.monotonic() + 120, False
        while not healthy and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                    healthy = json.load(reply)["status"] == "ok"
            except OSError:
                time.sleep(0.2)
        if not healthy:
            proc.kill()
            return subprocess.CompletedProcess(proc.args, 1, proc.communicate()[0], "/health never answered ok")
        proc.send_signal(signal.SIGINT)
        return subprocess.CompletedProcess(proc.args, proc.wait(60), proc.stdout.read(), "")
    finally:
        if proc.poll() is None:
            proc.kill()


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    if command.split()[1] == "serve":
        return _serve(command, cwd)
    stdin = "oak (noun):\n/exit\n" if command.split()[1] == "chat" else ""
    return subprocess.run(_argv(command), cwd=cwd, env=dsv3_env(), input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def results(workdir):
    """Every command's CompletedProcess, two running at a time (each uses one core)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(COMMANDS, pool.map(lambda c: _run(c, workdir), COMMANDS)))


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.split()[:3]) for c in COMMANDS])
def test_readme_command_runs_as_printed(command, results, workdir):
    result = results[command]
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    if command.startswith("dsv3 eval"):
        assert len(list(workdir.glob("runs/mmlu-*/summary.json"))) == 1  # the dated default --output
