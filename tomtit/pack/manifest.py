"""pack.json (what a pack is, and every file's size and sha256) and SHA256SUMS (the same hashes,
for install.sh's `sha256sum -c` on a board that has no tomtit yet); and their check."""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from tomtit.fsutil import sha256_file
from tomtit.pack import PackError

PACK_MANIFEST = "pack.json"
SUMS = "SHA256SUMS"
FORMAT = "tomtit-pack-1"


def _files(root: Path) -> list[str]:
    """Every file under root (relative POSIX paths, sorted) except pack.json itself."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != PACK_MANIFEST:
                out.append(rel)
    return sorted(out)


def write_pack_manifest(root: Path, facts: dict) -> dict:
    """SHA256SUMS for every file, then pack.json with `facts` and every file (SHA256SUMS too)."""
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
             for rel in _files(root) if rel != SUMS}
    (root / SUMS).write_text("".join(f"{e['sha256']}  {rel}\n" for rel, e in files.items()))
    files[SUMS] = {"bytes": (root / SUMS).stat().st_size, "sha256": sha256_file(root / SUMS)}
    manifest = {"format": FORMAT, **facts, "files": dict(sorted(files.items()))}
    (root / PACK_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_pack(path: str | Path, *, expect: str | None = None) -> dict:
    """Check a pack folder (or a .tar.gz of one) against its pack.json: every listed file present
    with its size and sha256, and no other file. Returns the manifest (with `pack_sha256`, the
    sha256 of pack.json); raises PackError naming the first file that is missing, damaged or not
    listed.

    pack.json can only vouch for the other files: whoever changes a file can rewrite pack.json
    too. `expect` closes that: the sha256 of pack.json that `tomtit device pack` printed when it
    built the pack, brought here by another channel than the pack itself."""
    if expect is not None and not _is_sha256(expect):
        raise PackError(f"--expect {expect!r}: the 64 hex digits of a sha256, as `tomtit device pack` printed it")
    path = Path(path)
    if path.is_file() and tarfile.is_tarfile(path):
        with tempfile.TemporaryDirectory(prefix="tomtit-pack-verify-") as tmp:
            return verify_pack(_extract_single_folder(path, Path(tmp)), expect=expect)
    if not path.is_dir():
        raise PackError(f"{path} is neither a pack folder nor a pack archive")
    mpath = path / PACK_MANIFEST
    if mpath.is_symlink():
        raise PackError(f"{mpath} is a symbolic link, not part of a pack")
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise PackError(f"{path} is not a pack: no {PACK_MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackError(f"{mpath} is not readable JSON: {e}") from None
    digest = sha256_file(mpath)
    if expect is not None and digest != expect.lower():
        raise PackError(f"{PACK_MANIFEST}: sha256 {digest}, not the expected {expect.lower()}: this is not the pack "
                        f"that was built (changed since, or another pack)")
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise PackError(f"{mpath} is not a {FORMAT} manifest")
    listed = manifest["files"]
    root = path.resolve()
    for rel in sorted(listed):
        entry = listed[rel]
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise PackError(f"{mpath}: files[{rel!r}] is not {{\"bytes\": N, \"sha256\": HEX}}: "
                            f"not a {FORMAT} manifest")
        if not _is_inside_name(rel):
            raise PackError(f"{mpath}: files[{rel!r}]: not a relative path inside the pack (absolute, '..', "
                            f"or not in normal form): refused")
        f = path / rel
        if f.is_symlink() or not f.resolve().is_relative_to(root):
            raise PackError(f"{rel}: a symbolic link, or under one: a pack holds plain files only")
        if not f.is_file():
            raise PackError(f"{rel}: missing from the pack")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise PackError(f"{rel}: damaged: {size} bytes, pack.json says {entry.get('bytes')}")
        if sha256_file(f) != entry.get("sha256"):
            raise PackError(f"{rel}: damaged: sha256 differs from pack.json")
    extra = [rel for rel in _files(path) if rel not in listed]
    if extra:
        raise PackError(f"{extra[0]}: not part of the pack (not in pack.json)")
    return {**manifest, "pack_sha256": digest}


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def _is_inside_name(rel: str) -> bool:
    """A name as write_pack_manifest writes them: relative, POSIX, normal form, never '..'."""
    p = PurePosixPath(rel)
    return (bool(rel) and not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel
            and "\\" not in rel and "\0" not in rel)


def write_archive(folder: Path, archive: Path) -> None:
    """folder -> archive (.tar.gz), with the folder's name as its one top-level entry."""
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        # 0600 from the start (not chmod after): the archive holds credentials.toml and tls.key
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an old tmp of the same name keeps its mode through O_CREAT
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz", compresslevel=6) as tar:
            tar.add(str(folder), arcname=archive.name.removesuffix(".tar.gz").removesuffix(".tgz"))
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)


def _extract_single_folder(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            p = Path(m.name)
            if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                raise PackError(f"{archive}: {m.name}: not a plain file inside the pack")
        tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
        if len(tops) != 1:
            raise PackError(f"{archive} holds {len(tops)} top-level entries, a pack archive one folder")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # older Pythons: the members were checked above
            tar.extractall(into)
    return into / tops.pop()
