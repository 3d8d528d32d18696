"""What end-to-end signatures cost per message: Ed25519 sign and verify of a MiniLM-sized f16
update and f32 model, as the device, edge and cloud do it (tomtit/signing.py).

    python bench/signing.py [--bundle runs/evaluation/bundle] [--repeat 2000]

Medians over `--repeat` calls each, one thread; and the bytes the envelope adds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="runs/evaluation/bundle", help="its manifest sets the adapter size")
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()

    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.adapter import unflatten
    from tomtit.manifest import load_manifest
    from tomtit.signing import Keyring, Signer
    from tomtit.wire import ModelMessage, encode_message

    manifest = load_manifest(args.bundle)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(manifest.buffer_size) * 1e-3).astype(np.float32)
    common = dict(job="job", bundle_id=manifest.bundle_id, base_version=3, version=4, num_samples=100,
                  local_steps=10, train_loss=1.0, energy_j=1.0, created_at=1.0,
                  update_id="0123456789abcdef0123456789abcdef", tensors=unflatten(values, manifest.trainable))
    messages = [  # (what, who signs it, the message)
        ("update (f16, device -> edge)", "d00", encode_message(ModelMessage(
            kind="update", sender="d00", is_delta=True, codec="f16", **common))),
        ("model (f32, node -> children)", "e0", encode_message(ModelMessage(
            kind="model", sender="e0", is_delta=False, codec="f32", **common))),
    ]
    for label, who, message in messages:
        signer = Signer(who, Ed25519PrivateKey.generate())
        keyring = Keyring({signer.identity: signer.public_key()})
        signed = signer.sign(message)
        assert keyring.verify(signed, expect_signer=signer.identity) == message
        sign_ms = median_ms(lambda: signer.sign(message), args.repeat)
        verify_ms = median_ms(lambda: keyring.verify(signed), args.repeat)
        print(f"{label:<32} {len(message) / 1024:7.1f} KiB: sign {sign_ms:.3f} ms, verify {verify_ms:.3f} ms, "
              f"envelope +{len(signed) - len(message)} bytes (signer id {signer.identity!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
