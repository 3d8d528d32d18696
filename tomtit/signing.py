"""End-to-end signatures on model and update messages (Ed25519).

The broker is a hop, not a trust anchor: a wrong ACL or a compromised bridge must not let anyone
inject a model or an update. Every node signs the models it publishes and every device (and
edge) signs the updates it sends; a receiver that holds a `Keyring` refuses a payload whose
signature is missing, unknown or wrong (reason `signature`), before parsing it further.

Envelope (prepended to the message bytes, so the safetensors message inside is untouched and a
chunked payload is signed once, as a whole, before it is split):

    b"TTSIG1" | u8 len(signer) | signer (ASCII id) | 64-byte Ed25519 signature | message

The signature covers b"TTSIG1" + signer + message: the signer's id is bound to the bytes, and the
receiver also checks that the signer is who the topic says sent it (`expect_signer`). Replaying a
signed message is not stopped here: update ids (exactly-once) and model versions do that.

Cost: `python bench/signing.py` (most of it is SHA-512 over the payload, so it grows with the
message); the envelope adds 71 bytes + the signer id's length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tomtit.wire.errors import WireError, _ID_RE

MAGIC = b"TTSIG1"
SIG_BYTES = 64


def _signed_bytes(signer: bytes, message: bytes) -> bytes:
    return MAGIC + signer + message


@dataclass(frozen=True)
class Signer:
    """Who we are and our private key: signs what we publish."""

    identity: str
    private_key: Ed25519PrivateKey = field(repr=False)  # never printed

    def __post_init__(self) -> None:
        if _ID_RE.fullmatch(self.identity) is None:
            raise ValueError(f"signer id {self.identity!r} must match [A-Za-z0-9_.-]{{1,64}}")

    @classmethod
    def from_raw(cls, identity: str, raw_private: bytes) -> "Signer":
        return cls(identity, Ed25519PrivateKey.from_private_bytes(raw_private))

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, message: bytes) -> bytes:
        who = self.identity.encode("ascii")
        sig = self.private_key.sign(_signed_bytes(who, message))
        return MAGIC + bytes([len(who)]) + who + sig + message


@dataclass(frozen=True)
class Keyring:
    """Public keys of the identities whose messages we accept (our parent, our children)."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def from_raw(cls, raw: dict[str, bytes]) -> "Keyring":
        return cls({k: Ed25519PublicKey.from_public_bytes(v) for k, v in raw.items()})

    def verify(self, payload: bytes, expect_signer: str | None = None) -> bytes:
        """The message inside a signed envelope, or WireError("signature", why)."""
        signer, sig, message = split_envelope(payload)
        if expect_signer is not None and signer != expect_signer:
            raise WireError("signature", f"signed by {signer!r}, but it came from {expect_signer!r}")
        key = self.keys.get(signer)
        if key is None:
            raise WireError("signature", f"no public key for {signer!r}")
        try:
            key.verify(sig, _signed_bytes(signer.encode("ascii"), message))
        except InvalidSignature:
            raise WireError("signature", f"bad signature from {signer!r}") from None
        return message


def is_signed(payload: bytes) -> bool:
    return payload[: len(MAGIC)] == MAGIC


def split_envelope(payload: bytes) -> tuple[str, bytes, bytes]:
    """(signer, signature, message) of a signed payload; WireError("signature") if it is not one."""
    if not is_signed(payload):
        raise WireError("signature", "the message is not signed")
    n = payload[len(MAGIC)] if len(payload) > len(MAGIC) else 0
    start = len(MAGIC) + 1
    if not 1 <= n <= 64 or len(payload) < start + n + SIG_BYTES + 1:
        raise WireError("signature", "truncated signature envelope")
    try:
        signer = payload[start:start + n].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("signature", "signer id is not ASCII") from None
    if _ID_RE.fullmatch(signer) is None:
        raise WireError("signature", "malformed signer id")
    sig = payload[start + n:start + n + SIG_BYTES]
    return signer, sig, payload[start + n + SIG_BYTES:]


def strip_unverified(payload: bytes) -> bytes:
    """The message inside an envelope without checking it (for a sender reading back its own
    staged payload), or the payload itself when it is not signed."""
    return split_envelope(payload)[2] if is_signed(payload) else payload
