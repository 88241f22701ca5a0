"""Atomic writes: a reader (or a SIGKILL) never sees half a file or half a folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def atomic_write_json(path: str, value: object) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_lines(path: str, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


@contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    The old folder is first renamed aside and removed only after the new one is in place, so a kill at any
    moment leaves either the old or the new complete folder (plus, at worst, a stale `.old`/`.tmp` sibling).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temp_path = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        yield temp_path
    except BaseException:
        shutil.rmtree(temp_path, ignore_errors=True)
        raise
    old_path = None
    if os.path.exists(path):
        old_path = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
        os.rmdir(old_path)
        os.replace(path, old_path)
    os.replace(temp_path, path)
    if old_path:
        shutil.rmtree(old_path, ignore_errors=True)
