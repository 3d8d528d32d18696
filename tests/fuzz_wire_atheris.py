"""Coverage-guided fuzzing of every parser that reads bytes from the network (atheris/libFuzzer):
the wire decoders, the signature envelope and the node's update-id hint for rejected payloads.

    python tests/fuzz_wire_atheris.py CORPUS_DIR -runs=20000 -max_len=4096

tests/test_wire.py runs it bounded (a fixed number of runs from a seed corpus of valid messages).
The contract is the same as the hypothesis fuzzers': a decoder returns or raises WireError; any
other exception (or a crash, or a hang) is a finding, and libFuzzer exits non-zero with the input
saved as crash-*. Atheris instruments the wire package's bytecode, so it steers mutations towards
branches the seed corpus does not reach (hypothesis mutates blind).
"""
from __future__ import annotations

import sys

import atheris

# atheris matches top-level packages: this instruments tomtit (wire, signing) and edge_broker (the hint)
with atheris.instrument_imports(include=["tomtit", "edge_broker"]):
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_broker.node import _update_id_hint
    from tomtit.manifest import TensorSpec
    from tomtit.signing import Keyring, Signer, split_envelope
    from tomtit.wire import (FlatDecoder, Reassembler, WireError, decode_ack, decode_acks, decode_error,
                             decode_message, decode_presence, decode_reply, decode_request, decode_run_config,
                             decode_telemetry, is_chunk)
    from tomtit.wire.infer import reply_address

BUNDLE = "0" * 64
MAX = 1 << 20
SPECS = [TensorSpec("lora_A", (4, 6)), TensorSpec("lora_B", (6, 4)), TensorSpec("bias", (1,))]
FLAT = FlatDecoder(SPECS, bundle_id=BUNDLE, max_bytes=MAX)
SIGNER = Signer("dev-1", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
KEYRING = Keyring({"dev-1": SIGNER.public_key()})
DECODERS = (
    lambda b: decode_message(b, expected=SPECS, bundle_id=BUNDLE, max_bytes=MAX),
    lambda b: decode_message(b, expected=None, bundle_id=None, max_bytes=MAX),
    lambda b: Reassembler(30, MAX).add(b, 0.0),
    lambda b: FLAT.decode(b),
    decode_ack, decode_acks, decode_presence, decode_error, decode_telemetry, decode_run_config,
    split_envelope, KEYRING.verify, lambda b: KEYRING.verify(b, expect_signer="dev-1"),
    decode_request, decode_reply, reply_address,  # served inference (reply_address never raises)
)


def seed_corpus() -> list[bytes]:
    """Valid messages of every kind, so the fuzzer starts past the first checks."""
    from tomtit.wire import (Ack, ModelMessage, Presence, encode_ack, encode_acks, encode_message,
                             encode_presence, split_payload)

    rng = np.random.default_rng(0)
    tensors = {s.name: rng.normal(0, 0.05, s.shape).astype(np.float32) for s in SPECS}
    out = []
    for codec in ("f32", "f16", "int8"):
        m = ModelMessage(kind="update", sender="dev-1", job="job1", bundle_id=BUNDLE, base_version=3, version=7,
                         num_samples=120, local_steps=15, train_loss=0.69, energy_j=12.5, is_delta=True,
                         created_at=1.7e9, update_id="0123456789abcdef0123456789abcdef", tensors=tensors,
                         codec=codec)
        out.append(encode_message(m))
    out += split_payload(out[0] + bytes(2000), update_id="0123456789abcdef0123456789abcdef", limit=1024)[:2]
    out.append(SIGNER.sign(out[1]))  # a signed f16 update
    out += [encode_ack(Ack("0123456789abcdef0123456789abcdef", "applied", "", 4)),
            encode_acks([Ack("f" * 32, "rejected", "norm", 3)]),
            encode_presence(Presence("dev-1", "online", "device", 2, 1.5))]
    from tomtit.wire import InferReply, InferRequest, encode_reply, encode_request

    out += [encode_request(InferRequest(texts=("goal", "shares"), reply_to="tomtit/j/infer/d1/reply/c1", id="r1")),
            encode_reply(InferReply(device="d1", ok=True, id="r1", adapter="global", version=3, step=9,
                                    labels=("a", "b"), results=({"label": "a", "probabilities": [0.9, 0.1]},)))]
    return out


def test_one_input(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except WireError:
            pass  # the one allowed failure
    if not isinstance(is_chunk(data), bool):
        raise AssertionError("is_chunk must answer True or False")
    hint = _update_id_hint(data)  # runs on payloads that already failed: it must never raise
    if hint and len(hint) != 32:
        raise AssertionError(f"update_id hint {hint!r}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--write-seeds":
        from pathlib import Path

        folder = Path(sys.argv[2])
        folder.mkdir(parents=True, exist_ok=True)
        for i, blob in enumerate(seed_corpus()):
            (folder / f"seed-{i:02d}").write_bytes(blob)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
