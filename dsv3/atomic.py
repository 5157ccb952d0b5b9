"""Atomic writes that respect the umask: every file and directory dsv3 saves (checkpoints, adapters, token caches).

    write_file(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    with directory(out / "checkpoint-000100") as tmp:   # filled in tmp, renamed to the target on success
        write_file(tmp / "trainer_state.json", lambda p: p.write_text(text))

A writer gets a temporary path beside the target and the result is renamed into place, so a crash never leaves a
half-written file. Files end up with the mode the umask gives a new file (0644 under umask 022), whatever the
writer did: safetensors' `save_file` creates its files 0600, which would keep a model from others in a shared group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator


def _temporary(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_file(target: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary path beside `target`, give it the umask's mode, rename it to `target`."""
    target = Path(target)
    tmp = _temporary(target)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask here
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` (an existing one is moved
    aside and deleted), on error it is deleted and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target)
    tmp.mkdir(0o777)  # umask-respecting, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        if target.exists():  # a directory cannot be renamed over a non-empty one: move the old aside first
            old = _temporary(target.with_name(f"old-{target.name}"))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
