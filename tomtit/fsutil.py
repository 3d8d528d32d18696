"""Crash-safe file writes: write a temp file in the same folder, fsync it, rename it over the
target, fsync the folder.

The last step is what makes "checkpoint before ack" survive a power cut: a rename is a change to
the directory, and until the directory is synced, ext4 (and the FAT/ext4 of an SD card) may lose
it on power loss, leaving the old file, or no file, after an ack was sent for the new one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make renames and creations in `folder` durable (POSIX: fsync on the directory itself)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform without directory handles (Windows): nothing more can be done
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. a few FUSE/network ones) refuse fsync on a directory
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def sha256_file(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def staging_dir(out: Path) -> Path:
    """A temporary sibling of `out` (same filesystem, so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a fully written staging folder into place, replacing `out` if it exists.

    The old folder is renamed aside first, so at every moment `out` is either the complete old
    or the complete new content; it is deleted only after the swap.
    """
    import shutil

    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; bundles and splits are meant to be shared
    for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(sub)  # the staged files' own entries, before they become visible
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        fsync_dir(out.parent)
