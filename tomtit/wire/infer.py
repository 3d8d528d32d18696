"""Served inference: a client's request to a device and the device's reply (small JSON).

    request  tomtit/{job}/infer/{device}/request          client -> device, QoS 1
             {"texts": [...], "adapter": "global"|"local", "reply_to": TOPIC, "id": ID,
              "max_new_tokens": N (optional; a causal-LM device only)}
    reply    tomtit/{job}/infer/{device}/reply/{token}    device -> client, QoS 0
             {"device", "id", "ok": true, "adapter", "version", "step", "labels", "results": [...]}
             {"device", "id", "ok": true, "adapter", "version", "step", "generated": [...]}  (causal LM)
             {"device", "id", "ok": false, "error": REASON, "detail"}

A classifier device answers labels and probabilities; a causal-LM device reads the texts as
prompts and answers the greedy continuation of each (`generated`, one string per text). A
classifier device ignores max_new_tokens (older devices ignore unknown keys anyway).

The reply topic comes from the request's `reply_to` (MQTT 3.1.1), or from MQTT 5's Response
Topic property (which wins when both are given and it is valid; an invalid one falls back to a
valid `reply_to`); either way it must be one of this device's own reply topics
(`Topics.infer_reply(device, token)`), so a request can never make a device publish anywhere else
(and the deployment's ACL lets a device write only there). `id` is echoed in the reply; MQTT 5's
Correlation Data, when given, is echoed as a property too.

`reply_to` (and `id`) in the JSON are REQUIRED wherever any hop speaks MQTT 3.1.1: a device
connected with 3.1.1 (the default), or a broker bridge (bridges forward 3.1.1, dropping MQTT 5
properties). There the Response Topic never reaches the device, and a request without `reply_to`
has nowhere to be answered: it is dropped (counted as unanswerable), and the client times out.
An MQTT 5-only client must therefore put its reply topic in the JSON too, as `tomtit infer` does.

The limits are what one training step can afford to serve between two steps (DESIGN.md §10:
"while it trains"): one request is answered by one inference batch.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from tomtit.wire.control import _REASON_RE, _json_encode, _json_object, _str_field
from tomtit.wire.errors import _ID_RE, WireError, _float_field, _int_field, _short
from tomtit.wire.topics import Topics

ADAPTER_KINDS = ("global", "local")  # the latest model adopted from the parent | the device's own, as trained so far
# One request = one ORT run, served between two training steps. 16 texts of 64 tokens (the default
# export's max length) take ~160 ms on MiniLM-L6 in process here, about as long as one batch-8
# training step (~170 ms): a device answering all it can does about one of each (bench/serve.py).
MAX_TEXTS_PER_REQUEST = 16
# The model reads only the bundle's max_length tokens (64 by default, ~300 characters of English;
# BERT-class models stop at 512, ~2,000 characters); beyond that a text only costs tokenizer time.
MAX_TEXT_CHARS = 2048
# 16 texts x 2,048 characters x 4 UTF-8 bytes = 128 KiB (what `encode_request` writes at its worst),
# twice over for a client that \u-escapes; a device parses nothing larger.
MAX_REQUEST_BYTES = 256 << 10
# Labels and probabilities of 16 texts; 1 MB is EMQX's default packet limit, and a reply is never
# chunked (it has no outbox behind it: a lost reply is retried by the client).
MAX_REPLY_BYTES = 1_000_000
MAX_LABELS = 1024
MAX_LABEL_CHARS = 128
MAX_CORRELATION_BYTES = 256  # MQTT 5 Correlation Data is the client's own opaque bytes, echoed back
# The head of a payload where `reply_topic_hint` looks for "reply_to" when the whole cannot be
# decoded (too large, not JSON): `encode_request` sorts keys, so it comes before the texts.
HINT_BYTES = 1024
# Generation is served between two training steps like a classification batch, but each token is
# one run of the model (SmolLM2-135M here: ~70-120 ms a token without a KV cache): 128 tokens hold
# training for seconds, and a headline or a short answer needs far fewer. Default: 32, as
# `tomtit generate`.
MAX_NEW_TOKENS = 128
DEFAULT_NEW_TOKENS = 32
# A generated text is at most MAX_NEW_TOKENS tokens; a token decodes to a few characters (a
# byte-level BPE token is at most ~16 bytes): 4,096 characters bound it with room to spare.
MAX_GENERATED_CHARS = 4096
_HINT_RE = re.compile(rb'"reply_to"\s*:\s*"([A-Za-z0-9_./-]{1,400})"')


def _check_texts(texts: object) -> tuple[str, ...]:
    if not isinstance(texts, (list, tuple)) or not texts:
        raise WireError("bad_schema", "texts must be a non-empty list of strings")
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise WireError("too_many_texts", f"{len(texts)} texts, limit {MAX_TEXTS_PER_REQUEST} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise WireError("bad_schema", f"texts[{i}] must be a string, got {type(t).__name__}")
        if len(t) > MAX_TEXT_CHARS:
            raise WireError("text_too_long", f"texts[{i}] has {len(t)} characters, limit {MAX_TEXT_CHARS}")
        try:
            # JSON's \ud800 decodes to a lone surrogate, which no tokenizer can encode: refused here,
            # it would otherwise fail the whole inference batch it shares with other requests
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WireError("bad_text", f"texts[{i}] is not valid Unicode (an unpaired surrogate at "
                                        f"{e.start})") from None
    return tuple(texts)


def _check_adapter(kind: object) -> str:
    if kind not in ADAPTER_KINDS:
        raise WireError("bad_adapter", f"adapter {_short(repr(kind), 40)} is not one of {ADAPTER_KINDS}")
    return kind


@dataclass(frozen=True)
class InferRequest:
    """What a client asks a device to classify."""

    texts: tuple[str, ...]
    adapter: str = "global"  # "global" | "local"
    reply_to: str = ""  # the reply topic; "" when MQTT 5's Response Topic carries it
    id: str = ""  # the client's correlation id, echoed in the reply
    max_new_tokens: int | None = None  # causal-LM devices: tokens to generate per text (None: DEFAULT_NEW_TOKENS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", _check_texts(self.texts))
        _check_adapter(self.adapter)
        n = self.max_new_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS):
            raise WireError("bad_max_new_tokens", f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, "
                                                  f"got {_short(repr(n), 40)}")
        if not isinstance(self.reply_to, str) or len(self.reply_to) > 512:
            raise WireError("bad_schema", "reply_to must be a topic string of at most 512 characters")
        _str_field(self.id, "id", _ID_RE, empty_ok=True)


def encode_request(request: InferRequest) -> bytes:
    obj = {"texts": list(request.texts), "adapter": request.adapter}
    if request.reply_to:
        obj["reply_to"] = request.reply_to
    if request.id:
        obj["id"] = request.id
    if request.max_new_tokens is not None:
        obj["max_new_tokens"] = request.max_new_tokens
    return _json_encode(obj, MAX_REQUEST_BYTES)


def decode_request(data: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> InferRequest:
    """A validated request (WireError with the reason otherwise). Unknown keys are ignored: a
    newer client may add options an older device does not know."""
    obj = _json_object(data, max_bytes)
    if "texts" not in obj:
        raise WireError("bad_schema", "a request lacks texts")
    return InferRequest(texts=obj["texts"], adapter=obj.get("adapter", "global"),
                        reply_to=obj.get("reply_to", ""), id=obj.get("id", ""),
                        max_new_tokens=obj.get("max_new_tokens"))


def reply_topic(topics: Topics, device: str, *, reply_to: str = "", response_topic: str | None = None) -> str:
    """The topic to answer on: MQTT 5's Response Topic, else the request's `reply_to`; it must be
    one of `device`'s own reply topics. A Response Topic that is not one falls back to a valid
    `reply_to` (a client may set the property from a different convention and the JSON right);
    when neither is valid, the error names the Response Topic's problem."""
    candidates = [t for t in (response_topic, reply_to) if t]
    if not candidates:
        raise WireError("no_reply_topic", "the request names no reply topic (reply_to, or MQTT 5's Response Topic)")
    first_error = None
    for topic in candidates:
        try:
            owner, _ = topics.parse_infer_reply(topic)
            if owner != device:
                raise WireError("bad_reply_topic", f"{_short(topic, 120)} is not a reply topic of device {device!r}")
            return topic
        except WireError as e:
            first_error = first_error or e
    raise first_error


def reply_topic_hint(data: bytes) -> str:
    """The "reply_to" at the head of a payload that does not decode (too large, not JSON): a
    bounded look at its first HINT_BYTES, so such a request still gets its error reply. The
    caller validates what this returns with `reply_topic`; "" when there is none."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return ""
    m = _HINT_RE.search(bytes(data[:HINT_BYTES]))
    return m.group(1).decode("ascii") if m else ""


def reply_address(data: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> tuple[str, str]:
    """(reply_to, id) of a request that `decode_request` refused, as far as they can be read, so
    it still gets its error reply: from the JSON object when it parses (texts too many or too
    long, an unknown adapter), else from the payload's head (`reply_topic_hint`). "" for what
    cannot be read; the caller validates the topic with `reply_topic`."""
    try:
        obj = _json_object(data, max_bytes)
    except (WireError, TypeError):
        return reply_topic_hint(data), ""
    reply_to, rid = obj.get("reply_to", ""), obj.get("id", "")
    return (reply_to if isinstance(reply_to, str) else "",
            rid if isinstance(rid, str) and _ID_RE.fullmatch(rid) else "")


def check_correlation(data: object) -> bytes | None:
    """MQTT 5 Correlation Data to echo (None without one); bounded like everything we keep."""
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_CORRELATION_BYTES:
        raise WireError("bad_correlation", f"correlation data must be at most {MAX_CORRELATION_BYTES} bytes")
    return bytes(data)


@dataclass(frozen=True)
class InferResult:
    label: str  # the most probable label
    probabilities: tuple[float, ...]  # one per label of the reply, in its order


@dataclass(frozen=True)
class InferReply:
    """A device's answer: results (ok) or an error reason (busy, too_many_texts, ...)."""

    device: str
    ok: bool
    id: str = ""  # the request's id, echoed
    error: str = ""  # a reason code when not ok
    detail: str = ""  # for humans
    adapter: str = ""  # the adapter kind used
    version: int = 0  # the global model's version: the one used ("global"), or the one "local" builds on
    step: int = 0  # the device's training steps so far (how far "local" has moved)
    labels: tuple[str, ...] = ()
    results: tuple[InferResult, ...] = ()
    generated: tuple[str, ...] = ()  # a causal-LM device's answer: one continuation per text (then no labels/results)
    queued_ms: float = 0.0  # waiting on the device for a gap between training steps
    infer_ms: float = 0.0  # the inference batch this request was part of

    def __post_init__(self) -> None:
        _str_field(self.device, "device", _ID_RE)
        if not isinstance(self.ok, bool):
            raise WireError("bad_schema", "ok must be true or false")
        _str_field(self.id, "id", _ID_RE, empty_ok=True)
        _str_field(self.detail, "detail", None)
        object.__setattr__(self, "detail", self.detail[:512])
        for name in ("version", "step"):
            object.__setattr__(self, name, _int_field(getattr(self, name), name, "bad_schema"))
        for name in ("queued_ms", "infer_ms"):
            object.__setattr__(self, name, _float_field(getattr(self, name), name, nonneg=True, reason="bad_schema"))
        if not self.ok:
            _str_field(self.error, "error", _REASON_RE)
            return
        if self.error:
            raise WireError("bad_schema", "an ok reply carries no error")
        _check_adapter(self.adapter)
        if self.generated:
            self._check_generated()
            return
        labels = self.labels
        if (not isinstance(labels, (list, tuple)) or not 1 <= len(labels) <= MAX_LABELS
                or not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels)):
            raise WireError("bad_schema", f"labels must be 1..{MAX_LABELS} strings of 1..{MAX_LABEL_CHARS} characters")
        object.__setattr__(self, "labels", tuple(labels))
        results = self.results
        if not isinstance(results, (list, tuple)) or not 1 <= len(results) <= MAX_TEXTS_PER_REQUEST:
            raise WireError("bad_schema", f"results must hold 1..{MAX_TEXTS_PER_REQUEST} entries")
        object.__setattr__(self, "results", tuple(self._result(r) for r in results))

    def _check_generated(self) -> None:
        gen = self.generated
        if not isinstance(gen, (list, tuple)) or not 1 <= len(gen) <= MAX_TEXTS_PER_REQUEST:
            raise WireError("bad_schema", f"generated must hold 1..{MAX_TEXTS_PER_REQUEST} strings")
        if not all(isinstance(g, str) and len(g) <= MAX_GENERATED_CHARS for g in gen):
            raise WireError("bad_schema", f"generated must be strings of at most {MAX_GENERATED_CHARS} characters")
        if self.labels or self.results:
            raise WireError("bad_schema", "a reply carries either generated texts or labels and results, not both")
        object.__setattr__(self, "generated", tuple(gen))

    def _result(self, r: object) -> InferResult:
        if isinstance(r, InferResult):
            label, probs = r.label, r.probabilities
        elif isinstance(r, dict) and "label" in r and "probabilities" in r:
            label, probs = r["label"], r["probabilities"]
        else:
            raise WireError("bad_schema", "a result needs label and probabilities")
        if label not in self.labels:
            raise WireError("bad_schema", f"label {_short(repr(label), 60)} is not among the reply's labels")
        if not isinstance(probs, (list, tuple)) or len(probs) != len(self.labels):
            raise WireError("bad_schema", f"probabilities must hold one number per label ({len(self.labels)})")
        probs = tuple(_float_field(p, "probability", nonneg=True, reason="bad_schema", limit=1.0) for p in probs)
        return InferResult(label, probs)

    def probabilities(self, i: int) -> dict[str, float]:
        """Result i's probabilities by label."""
        return dict(zip(self.labels, self.results[i].probabilities))


def encode_reply(reply: InferReply) -> bytes:
    obj: dict[str, Any] = {"device": reply.device, "ok": reply.ok, "id": reply.id}
    if reply.ok and reply.generated:
        obj.update(adapter=reply.adapter, version=reply.version, step=reply.step, generated=list(reply.generated),
                   queued_ms=round(reply.queued_ms, 3), infer_ms=round(reply.infer_ms, 3))
    elif reply.ok:
        obj.update(adapter=reply.adapter, version=reply.version, step=reply.step, labels=list(reply.labels),
                   results=[{"label": r.label, "probabilities": list(r.probabilities)} for r in reply.results],
                   queued_ms=round(reply.queued_ms, 3), infer_ms=round(reply.infer_ms, 3))
    else:
        obj.update(error=reply.error, detail=reply.detail)
    return _json_encode(obj, MAX_REPLY_BYTES)


def decode_reply(data: bytes, max_bytes: int = MAX_REPLY_BYTES) -> InferReply:
    obj = _json_object(data, max_bytes)
    for key in ("device", "ok"):
        if key not in obj:
            raise WireError("bad_schema", f"a reply lacks {key}")
    names = {f.name for f in dataclasses.fields(InferReply)}
    return InferReply(**{k: v for k, v in obj.items() if k in names})


def error_reply(device: str, reason: str, detail: str = "", request_id: str = "") -> InferReply:
    """An error answer; `request_id` is echoed only when it is a valid id."""
    rid = request_id if isinstance(request_id, str) and _ID_RE.fullmatch(request_id) else ""
    return InferReply(device=device, ok=False, id=rid, error=reason, detail=detail)


def finite_probabilities(row) -> tuple[float, ...]:
    """Softmax output as wire floats: clipped into [0, 1] (float rounding can leave 1 + 1e-7)."""
    return tuple(min(1.0, max(0.0, float(p))) if math.isfinite(p) else 0.0 for p in row)
