"""Served inference: the device answers classification (or, with a causal LM, generation) requests
between its training steps.

    transport           -> shed on arrival      requests larger than MAX_REQUEST_BYTES, and any beyond
                                                max_inbound waiting, are dropped before they are queued
                                                (counted: summary()["shed"]); Transport.shed
    agent.drain_inbound -> server.offer(msg)    at most max_offers_per_drain requests per call (the
                                                rest wait for the next); decode and validate at once:
                                                a bad request, or one that finds the queue full
                                                ("busy"), is answered with an error right away (no
                                                model run: cheap; error replies are rate-limited)
    agent.step          -> server.serve(agent)  then one training step: at most ONE inference batch
                                                per step (<= MAX_TEXTS_PER_REQUEST texts, one ORT run),
                                                so training slows by at most one batch per step

Requests in the queue are served first come, first served; consecutive requests for the same
adapter share a batch up to its size. "global" is the latest model the device adopted from its
parent, "local" the device's own adapter as trained so far (tomtit.wire.infer). Clock, transport
and the classifier are injected (the classifier is loaded at the first request, so a device that
nobody asks never pays for a second ORT session's memory). Nothing a request contains can stop
training: every failure becomes an error reply, or a dropped request when there is nowhere to
reply to. A batch that fails (a text the tokenizer chokes on) fails only the request that broke
it: its requests go back to the head of the queue to be run one by one (still one run per gap),
so the others in it are answered.

Generation (a causal-LM bundle, `load_generator`): a request's texts are prompts, answered with
their greedy continuations. A generation "batch" is ONE request per gap between steps: at most
MAX_GENERATE_TEXTS prompts and at most MAX_GENERATE_TOKENS new tokens in all (prompts x
max_new_tokens, refused with "too_many_tokens" beyond): each new token is one run of the model, so
the token budget, not the prompt count, bounds how long one gap holds training.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from device_runtime.inference import Classifier, softmax
from tomtit.transport import Inbound, Transport
from tomtit.wire import (MAX_REQUEST_BYTES, MAX_TEXTS_PER_REQUEST, InferReply, InferRequest, InferResult, Topics,
                         WireError, decode_request, encode_reply, error_reply, reply_topic)
from tomtit.wire.infer import DEFAULT_NEW_TOKENS, check_correlation, finite_probabilities, reply_address

log = logging.getLogger("tomtit.serving")

# A full queue answers "busy" at once instead of letting a client wait: 32 requests are 32 training
# steps of waiting at worst (~6 s at MiniLM's 0.2 s/step here; a Pi 4 is slower), and at most
# 32 x 128 KiB of texts in memory.
MAX_QUEUED_REQUESTS = 32
# Prompts per generation request: 4 x 32 tokens is ~10 s of SmolLM2-135M here without a KV cache,
# all of it between two training steps; a client with more prompts sends more requests.
MAX_GENERATE_TEXTS = 4
# New tokens per generation request, all prompts together: 4 x 32 (the default max_new_tokens) or
# 1 x 128, never 4 x 128. SmolLM2-135M made 112 tokens in 5.6 s with the KV cache, 23.7 s without
# (README, bench/generate.py): this, not the prompt count, is what one gap between steps can cost.
MAX_GENERATE_TOKENS = 128
# Requests received but not yet offered (in the transport's queue): beyond, dropped on arrival.
# 64 x 256 KiB = 16 MiB at worst; the drain takes max_queued + 1 of them per step.
MAX_INBOUND_REQUESTS = 64
# Error replies answered at once (offer time) cost a publish each and nothing limits how fast a
# client can send bad requests: a token bucket of 20, refilled at 5 a second, answers any honest
# client's mistakes and caps what a flood makes the device send (the rest are counted, unsent).
ERROR_REPLIES_PER_S = 5.0
ERROR_REPLY_BURST = 20


@dataclass(frozen=True)
class ServeConfig:
    device_id: str  # whose requests we answer: tomtit/{job}/infer/{device_id}/request
    job: str = "default"
    max_queued: int = MAX_QUEUED_REQUESTS  # requests waiting for a gap between steps; more get "busy"
    max_batch_texts: int = MAX_TEXTS_PER_REQUEST  # texts per inference batch, i.e. per training step
    max_inbound: int = MAX_INBOUND_REQUESTS  # requests waiting in the transport; more are dropped on arrival
    error_replies_per_s: float = ERROR_REPLIES_PER_S  # immediate error replies: sustained rate
    error_reply_burst: int = ERROR_REPLY_BURST  # ... and burst; beyond, counted and not sent


@dataclass(frozen=True)
class ServedAdapter:
    params: np.ndarray  # flat float32 in the manifest's order
    version: int  # the global model's version (the one used, or the one local training builds on)
    step: int  # the device's training steps so far


class AdapterSource(Protocol):
    """What the server asks for the adapter of a kind (the device agent implements it)."""

    def served_adapter(self, kind: str) -> ServedAdapter | None:
        """The adapter to answer with; None while there is none (no global model adopted yet)."""


@dataclass
class ServeStats:
    requests: int = 0  # received
    answered: int = 0  # answered with results
    texts: int = 0  # classified
    batches: int = 0  # inference batches run (at most one per training step)
    infer_s: float = 0.0  # time in inference batches, classifier loading included
    errors: dict[str, int] = field(default_factory=dict)  # refusals by reason ("busy" among them), sent or not
    unanswerable: int = 0  # no valid reply topic: dropped
    errors_unsent: int = 0  # error replies the rate limit suppressed (still counted in errors)
    max_queued: int = 0  # the longest the queue got


@dataclass(frozen=True)
class _Pending:
    request: InferRequest
    topic: str  # where to reply
    correlation: bytes | None  # MQTT 5 Correlation Data to echo
    received_at: float
    alone: bool = False  # its batch failed: run it by itself, so only a failing request fails


class InferenceServer:
    def __init__(self, config: ServeConfig, *, transport: Transport,
                 load_classifier: Callable[[], Classifier] | None = None,
                 load_generator: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Exactly one of `load_classifier` (labels and probabilities) and `load_generator` (a
        `device_runtime.generation.Generator`: generated text) is given; either is called once,
        at the first request that needs it."""
        if (load_classifier is None) == (load_generator is None):
            raise ValueError("give one of load_classifier and load_generator")
        self.cfg = config
        self.generates = load_generator is not None
        self.transport = transport
        self.clock = clock
        self.topics = Topics(config.job)
        self.request_topic = self.topics.infer_request(config.device_id)
        self._load_classifier = load_classifier or load_generator
        self._classifier = None  # the Classifier or Generator, once loaded
        self._unavailable = ""  # why we can no longer answer ("" while we can)
        self._queue: deque[_Pending] = deque()
        self._warned: set[str] = set()
        self._error_tokens = float(config.error_reply_burst)  # the error replies' token bucket
        self._error_refilled = clock()
        self.stats = ServeStats()

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def max_offers_per_drain(self) -> int:
        """Requests the agent offers per drain: enough to fill an empty queue and tell one more
        "busy"; the rest wait in the transport (bounded by max_inbound), so a flood cannot keep
        a drain, and the training step after it, from ending."""
        return self.cfg.max_queued + 1

    def subscribe(self) -> None:
        # QoS 0: the broker keeps nothing for us while we are offline, so a device coming back
        # does not answer a backlog of requests whose clients gave up long ago.
        self.transport.subscribe(self.request_topic, qos=0)
        shed = getattr(self.transport, "shed", None)
        if shed is not None:  # every tomtit Transport; a test double may lack it
            shed(self.request_topic, max_bytes=MAX_REQUEST_BYTES, max_pending=self.cfg.max_inbound)

    # -- requests in -----------------------------------------------------------------------
    def offer(self, msg: Inbound) -> None:
        """Queue a request, or answer it with an error now (malformed, too large, queue full)."""
        self.stats.requests += 1
        request, problem = None, None
        try:
            request = decode_request(msg.payload)
            reply_to, request_id = request.reply_to, request.id
        except WireError as e:
            problem = e
            reply_to, request_id = reply_address(msg.payload)
        try:
            topic = reply_topic(self.topics, self.cfg.device_id, reply_to=reply_to, response_topic=msg.response_topic)
        except WireError as e:
            self.stats.unanswerable += 1
            self._note(e.reason, "dropped an inference request with nowhere to reply: %s%s", e,
                       f" (and the request: {problem})" if problem else "")
            return
        try:
            correlation = check_correlation(msg.correlation_data)
        except WireError as e:
            correlation, problem = None, problem or e
        if problem is None and self.generates:
            problem = _generation_problem(request)
        if problem is not None:
            self._reply_error(topic, correlation, request_id, problem.reason, problem.detail, limited=True)
        elif self._unavailable:
            self._reply_error(topic, correlation, request_id, "unavailable", self._unavailable, limited=True)
        elif len(self._queue) >= self.cfg.max_queued:
            self._reply_error(topic, correlation, request_id, "busy",
                              f"{len(self._queue)} requests are waiting (limit {self.cfg.max_queued}); retry later",
                              limited=True)
        else:
            self._queue.append(_Pending(request, topic, correlation, self.clock()))
            self.stats.max_queued = max(self.stats.max_queued, len(self._queue))

    # -- one batch between two training steps ----------------------------------------------
    def serve(self, adapters: AdapterSource) -> int:
        """Answer the oldest request, and those right behind it for the same adapter that fit in
        the same batch; one ORT run at most. Returns the number of texts classified."""
        if not self._queue:
            return 0
        if self.generates:
            return self._generate(self._queue.popleft(), adapters)
        batch = [self._queue.popleft()]
        kind, n = batch[0].request.adapter, len(batch[0].request.texts)
        while (not batch[0].alone and self._queue and not self._queue[0].alone
               and self._queue[0].request.adapter == kind
               and n + len(self._queue[0].request.texts) <= self.cfg.max_batch_texts):
            batch.append(self._queue.popleft())
            n += len(batch[-1].request.texts)
        adapter = adapters.served_adapter(kind)
        if adapter is None:
            for p in batch:
                self._reply_error(p.topic, p.correlation, p.request.id, "no_global_model",
                                  "no global model has reached the device yet; ask for the local adapter")
            return 0
        t0 = self.clock()
        classifier = self._classifier_or_none()
        if classifier is None:
            for p in batch:
                self._reply_error(p.topic, p.correlation, p.request.id, "unavailable", self._unavailable)
            return 0
        texts = [t for p in batch for t in p.request.texts]
        try:
            logits = classifier.logits_for_texts(texts, adapter.params, batch_size=len(texts))
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf rows are answered "non_finite" below
                probs = softmax(logits)
        except Exception as e:  # noqa: BLE001 - a request must never stop training; logged and answered
            if len(batch) > 1:
                # One request's text may be what failed: its neighbours must not fail with it. Run
                # each by itself in the next gaps (still one run per gap), in the same order.
                self._note("batch_failed", "an inference batch of %d requests failed (%s); running them one by one",
                           len(batch), e)
                for p in reversed(batch):
                    self._queue.appendleft(_Pending(p.request, p.topic, p.correlation, p.received_at, alone=True))
                return 0
            self._note("internal", "inference failed on a request of %d texts: %s", len(texts), e, exc_info=True)
            self._reply_error(batch[0].topic, batch[0].correlation, batch[0].request.id, "internal",
                              f"inference failed: {e}")
            return 0
        t1 = self.clock()
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self.stats.infer_s += max(0.0, t1 - t0)
        labels = tuple(classifier.manifest.labels)
        i = 0
        for p in batch:
            rows = probs[i:i + len(p.request.texts)]
            i += len(p.request.texts)
            if not np.isfinite(rows).all():
                # NaN or inf out of the model (an adapter gone bad, an overflow): no label is an
                # answer, and argmax over NaN would name labels[0] with a confident face
                self._reply_error(p.topic, p.correlation, p.request.id, "non_finite",
                                  "the model's output for this request is not finite (NaN or inf)")
                continue
            results = tuple(InferResult(labels[int(np.argmax(r))], finite_probabilities(r)) for r in rows)
            self.stats.answered += 1
            self._send(p.topic, p.correlation, InferReply(
                device=self.cfg.device_id, ok=True, id=p.request.id, adapter=kind, version=adapter.version,
                step=adapter.step, labels=labels, results=results,
                queued_ms=max(0.0, t0 - p.received_at) * 1000, infer_ms=max(0.0, t1 - t0) * 1000))
        return len(texts)

    def _generate(self, p: _Pending, adapters: AdapterSource) -> int:
        """One generation request: the greedy continuation of each of its prompts."""
        kind = p.request.adapter
        adapter = adapters.served_adapter(kind)
        if adapter is None:
            self._reply_error(p.topic, p.correlation, p.request.id, "no_global_model",
                              "no global model has reached the device yet; ask for the local adapter")
            return 0
        t0 = self.clock()
        generator = self._classifier_or_none()
        if generator is None:
            self._reply_error(p.topic, p.correlation, p.request.id, "unavailable", self._unavailable)
            return 0
        tokens = p.request.max_new_tokens or DEFAULT_NEW_TOKENS
        try:
            texts = tuple(generator.generate(prompt, adapter.params, max_new_tokens=tokens)
                          for prompt in p.request.texts)
        except Exception as e:  # noqa: BLE001 - a request must never stop training; logged and answered
            self._note("internal", "generation failed for a request of %d prompts: %s", len(p.request.texts), e,
                       exc_info=True)
            self._reply_error(p.topic, p.correlation, p.request.id, "internal", f"generation failed: {e}")
            return 0
        t1 = self.clock()
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self.stats.infer_s += max(0.0, t1 - t0)
        self.stats.answered += 1
        self._send(p.topic, p.correlation, InferReply(
            device=self.cfg.device_id, ok=True, id=p.request.id, adapter=kind, version=adapter.version,
            step=adapter.step, generated=texts, queued_ms=max(0.0, t0 - p.received_at) * 1000,
            infer_ms=max(0.0, t1 - t0) * 1000))
        return len(texts)

    def close(self, reason: str = "the device is stopping") -> None:
        """Answer what is still queued with "unavailable" (the agent is shutting down)."""
        self._unavailable = reason
        while self._queue:
            p = self._queue.popleft()
            self._reply_error(p.topic, p.correlation, p.request.id, "unavailable", reason)

    def summary(self) -> dict:
        s = self.stats
        return {"requests": s.requests, "answered": s.answered, "texts": s.texts, "batches": s.batches,
                "infer_s": round(s.infer_s, 3), "errors": dict(s.errors), "errors_unsent": s.errors_unsent,
                "unanswerable": s.unanswerable, "shed": dict(getattr(self.transport, "shed_counts", {})),
                "max_queued": s.max_queued, "pending": len(self._queue)}

    # -- internals -------------------------------------------------------------------------
    def _classifier_or_none(self):
        """The loaded Classifier (or Generator), or None when it cannot be loaded."""
        if self._classifier is None and not self._unavailable:
            try:
                self._classifier = self._load_classifier()
                log.info("inference session loaded for served requests")
            except Exception as e:  # noqa: BLE001 - a missing or broken inference model must not stop training
                log.error("cannot serve inference: %s", e)
                self._unavailable = f"the device cannot load its inference model: {e}"
        return self._classifier

    def _reply_error(self, topic: str, correlation: bytes | None, request_id: str, reason: str, detail: str,
                     *, limited: bool = False) -> None:
        """`limited`: an error found at offer time, as fast as requests arrive, so rate-limited
        (a token bucket per device). Errors at serve time are bounded by the queue and the step
        rate already, and are always sent."""
        self.stats.errors[reason] = self.stats.errors.get(reason, 0) + 1
        self._note(reason, "inference request refused (%s): %s", reason, detail)
        if limited and not self._take_error_token():
            self.stats.errors_unsent += 1
            return
        self._send(topic, correlation, error_reply(self.cfg.device_id, reason, detail, request_id))

    def _take_error_token(self) -> bool:
        now = self.clock()
        earned = max(0.0, now - self._error_refilled) * self.cfg.error_replies_per_s
        self._error_tokens = min(float(self.cfg.error_reply_burst), self._error_tokens + earned)
        self._error_refilled = now
        if self._error_tokens >= 1.0:
            self._error_tokens -= 1.0
            return True
        return False

    def _send(self, topic: str, correlation: bytes | None, reply: InferReply) -> None:
        try:
            payload = encode_reply(reply)
        except WireError as e:  # e.g. a label set too large for one reply
            payload = encode_reply(error_reply(self.cfg.device_id, e.reason, e.detail, reply.id))
        try:
            # QoS 0: a reply is worth something only to a client still waiting, which retries on
            # a timeout; QoS 1 would also hold the link "busy" and postpone the device's updates.
            if correlation is None:
                self.transport.publish(topic, payload, qos=0)
            else:
                self.transport.publish(topic, payload, qos=0, correlation_data=correlation)
        except ConnectionError as e:
            log.debug("reply to %s not sent: %s", topic, e)

    def _note(self, reason: str, fmt: str, *args, exc_info: bool = False) -> None:
        """A warning the first time per reason (with the traceback when `exc_info`), then debug
        without one: a flood of bad requests must not flood the log."""
        first = reason not in self._warned
        self._warned.add(reason)
        log.log(logging.WARNING if first else logging.DEBUG, fmt, *args, exc_info=exc_info and first)


def _generation_problem(request: InferRequest) -> WireError | None:
    """Why a generation request is more than one gap between training steps may cost, or None."""
    n = len(request.texts)
    if n > MAX_GENERATE_TEXTS:
        return WireError("too_many_texts", f"{n} prompts, limit {MAX_GENERATE_TEXTS} per generation request "
                                           "(each token is a run of the model)")
    tokens = request.max_new_tokens or DEFAULT_NEW_TOKENS
    if n * tokens > MAX_GENERATE_TOKENS:
        return WireError("too_many_tokens", f"{n} prompts x {tokens} new tokens = {n * tokens}, limit "
                                            f"{MAX_GENERATE_TOKENS} per generation request (fewer prompts or a "
                                            "smaller max_new_tokens)")
    return None
