"""A node's durable state in ONE file, replaced atomically after every aggregation.

One safetensors file holds the model, what was pushed upward, and (in its string metadata) the
version counters and every applied update_id. A single file means a crash leaves either the old
or the new checkpoint, never a model from one aggregation with the seen-ids of another — which
would break exactly-once (an update applied but not remembered would be applied again).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomtit.fsutil import atomic_write_bytes
from tomtit.manifest import Manifest

CHECKPOINT_FILE = "node-checkpoint.safetensors"
log = logging.getLogger("tomtit.node")


@dataclass(frozen=True, eq=False)
class NodeCheckpoint:
    model: np.ndarray  # flat adapter buffer of this node's current model
    pushed: np.ndarray  # what the parent holds of us (== model for the cloud)
    version: int  # this node's model version
    parent_version: int  # last parent model merged (edges)
    # update_id -> the base_version its sender reported, for every applied update a re-send of
    # which would not be refused as stale anyway (see Node.prune_seen): exactly-once across restarts
    seen: Mapping[str, int]
    # edge: staged upward pushes already added to `pushed`
    accounted: tuple[str, ...] = ()
    # highest staleness horizon ever used to prune `seen` (Node.prune_seen)
    seen_horizon: int = 0


def save_checkpoint(state_dir: Path, manifest: Manifest, ck: NodeCheckpoint) -> None:
    from safetensors.numpy import save

    meta = {"bundle_id": manifest.bundle_id, "version": str(ck.version),
            "parent_version": str(ck.parent_version), "seen": json.dumps(dict(ck.seen), separators=(",", ":")),
            "accounted": json.dumps(list(ck.accounted or ())), "seen_horizon": str(ck.seen_horizon)}
    data = save({"model": np.ascontiguousarray(ck.model, np.float32),
                 "pushed": np.ascontiguousarray(ck.pushed, np.float32)}, metadata=meta)
    atomic_write_bytes(Path(state_dir) / CHECKPOINT_FILE, data)


def _seen(value: object) -> dict[str, int]:
    if isinstance(value, dict) and all(isinstance(u, str) and type(b) is int for u, b in value.items()):
        return value
    raise ValueError("its seen update ids are malformed")


def load_checkpoint(state_dir: Path, manifest: Manifest) -> NodeCheckpoint | None:
    """The saved state, or None when there is none or it belongs to another bundle (logged)."""
    from safetensors import SafetensorError, safe_open

    path = Path(state_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            model, pushed = f.get_tensor("model"), f.get_tensor("pushed")
        if meta.get("bundle_id") != manifest.bundle_id:
            log.warning("checkpoint %s is for bundle %s, not %s: starting fresh", path, meta.get("bundle_id"),
                        manifest.bundle_id)
            return None
        if model.shape != (manifest.buffer_size,) or pushed.shape != model.shape:
            raise ValueError(f"checkpoint tensors have shape {model.shape}, bundle needs ({manifest.buffer_size},)")
        return NodeCheckpoint(model=model.astype(np.float32), pushed=pushed.astype(np.float32),
                              version=int(meta["version"]), parent_version=int(meta["parent_version"]),
                              seen=_seen(json.loads(meta["seen"])),
                              accounted=tuple(json.loads(meta["accounted"])),
                              seen_horizon=int(meta["seen_horizon"]))
    except (SafetensorError, ValueError, KeyError, OSError) as e:
        # Refuse to silently start over: that would re-apply updates already acknowledged.
        from tomtit.errors import TomtitError

        raise TomtitError(f"node checkpoint {path} is unreadable ({e}); move it away to start fresh") from None
