"""Crash-safe writes: the data and the rename are both made durable (file fsync, then dir fsync)."""
from __future__ import annotations

import os

import pytest

from tomtit import fsutil


@pytest.fixture
def synced(monkeypatch):
    """Paths passed to os.fsync, in order (resolved through /proc, so files and folders show)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(fsutil.os, "fsync", spy)
    return seen


def test_an_atomic_write_syncs_the_file_then_its_folder_after_the_rename(tmp_path, synced):
    target = tmp_path / "state.bin"
    fsutil.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert len(synced) == 2
    assert os.path.dirname(synced[0]) == str(tmp_path) and synced[0] != str(target)  # the temp file
    assert synced[1] == str(tmp_path)  # the folder, after the rename: the rename itself is durable


def test_publishing_a_folder_syncs_its_parent_after_the_swap(tmp_path, synced):
    out = tmp_path / "bundle"
    for content in (b"v1", b"v2"):
        tmp = fsutil.staging_dir(out)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_bytes(content)
        synced.clear()
        fsutil.publish_dir(tmp, out)
        assert (out / "sub" / "f").read_bytes() == content
        assert synced[-1] == str(tmp_path)
        assert not list(tmp_path.glob(".bundle.*"))  # no staging or old folder left behind
