"""Atomic file output: write to a temporary file beside the target, then rename over it."""

import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed.

    An interrupted run never leaves a half-written file under the final name. The temporary name
    keeps the suffix, so writers that pick a format from it (matplotlib, torch) still work. It names the host,
    the process and a random part: processes of different machines (whose PIDs can be equal, e.g. in
    containers) writing to one shared folder never share a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(frame, path: str | Path, **to_csv) -> Path:
    """`frame.to_csv(path, index=False, **to_csv)`, atomically; returns the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **to_csv)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
