"""Temporary files and folders for atomic writes: written beside the target, then renamed over it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def sibling_temp_file(path: Path) -> str:
    """An empty temporary file in ``path``'s folder with the mode a plain ``open`` would give.

    ``tempfile.mkstemp`` creates files readable by their owner only (0600); once renamed
    over ``path``, run folders and reports would stay unreadable to the user's group, so
    the file gets ``0666`` minus the umask, as ``open(path, "w")`` would.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def sibling_temp_dir(path: Path) -> Path:
    """An empty temporary folder beside ``path`` with the mode ``mkdir`` would give (``mkdtemp``'s is 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp
