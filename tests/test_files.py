"""Atomic writes leave files with the mode a plain open() gives, not mkstemp's owner-only 0600."""

from __future__ import annotations

import os
import stat

from smartfed.files import sibling_temp_dir, sibling_temp_file
from smartfed.run.folder import atomic_write_bytes


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "report.md", b"x")
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o640
        os.umask(0o022)
        atomic_write_bytes(tmp_path / "report.md", b"y")
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
        assert (tmp_path / "report.md").read_bytes() == b"y"
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left behind


def test_sibling_temp_file_is_empty_and_beside_the_target(tmp_path):
    tmp = sibling_temp_file(tmp_path / "router.safetensors")
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.getsize(tmp) == 0


def test_sibling_temp_dir_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = sibling_temp_dir(tmp_path / "adapter")
    finally:
        os.umask(old)
    assert folder.parent == tmp_path and stat.S_IMODE(folder.stat().st_mode) == 0o755
