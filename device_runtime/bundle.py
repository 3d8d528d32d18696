"""Opening a bundle on the device: manifest, file integrity, paths."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tomtit.fsutil import sha256_file
from tomtit.manifest import BundleError, Manifest, load_manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, role: str) -> Path:
        entry = self.manifest.files.get(role)
        if entry is None:
            raise BundleError(f"bundle {self.root} has no {role} file in its manifest")
        return self.root / entry["name"]

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id


def open_bundle(root: str | Path, *, roles: tuple[str, ...] | None = None, verify: bool = True) -> Bundle:
    """Load the manifest and check the files this process will use.

    Checking sha256 before ORT touches a file matters: ORT 1.19 can crash the process on a
    truncated checkpoint instead of raising, and a clear "checkpoint is corrupt" beats a segfault.
    """
    root = Path(root)
    manifest = load_manifest(root)
    bundle = Bundle(root=root, manifest=manifest)
    for role in roles if roles is not None else tuple(manifest.files):
        entry = manifest.files.get(role)
        if entry is None:
            raise BundleError(f"bundle {root} lacks the {role} file")
        path = root / entry["name"]
        if not path.is_file():
            raise BundleError(f"bundle {root} is incomplete: {entry['name']} is missing")
        if verify:
            if path.stat().st_size != entry["bytes"]:
                raise BundleError(
                    f"{path} is corrupt: {path.stat().st_size} bytes, manifest says {entry['bytes']}"
                )
            if sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{path} is corrupt: sha256 does not match the manifest")
    return bundle
