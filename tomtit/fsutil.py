"""Crash-safe file writes: write a temp file in the same folder, fsync, rename over the target."""
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
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
