"""Served inference: the device answers classification (or, with a causal LM, generation) requests
between its training steps.

    agent.drain_inbound -> server.offer(msg)    decode and validate at once; a bad request, or one
                                                that finds the queue full ("busy"), is answered with
                                                an error right away (no model run: cheap)
    agent.step          -> server.serve(agent)  then one training step: at most ONE inference batch
                                                per step (<= MAX_TEXTS_PER_REQUEST texts, one ORT run),
                                                so training slows by at most one batch per step

Requests in the queue are served first come, first served; consecutive requests for the same
adapter share a batch up to its size. "global" is the latest model the device adopted from its
parent, "local" the device's own adapter as trained so far (tomtit.wire.infer). Clock, transport
and the classifier are injected (the classifier is loaded at the first request, so a device that
nobody asks never pays for a second ORT session's memory). Nothing a request contains can stop
training: every failure becomes an error reply, or a dropped request when there is nowhere to
reply to.

Generation (a causal-LM bundle, `load_generator`): a request's texts are prompts, answered with
their greedy continuations. One generation request per gap between steps, at most
MAX_GENERATE_TEXTS prompts of at most its max_new_tokens each: each new token is one run of the
model, so a request costs what a classification batch does many times over.
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
from tomtit.wire import (MAX_TEXTS_PER_REQUEST, InferReply, InferRequest, InferResult, Topics, WireError,
                         decode_request, encode_reply, error_reply, reply_topic)
from tomtit.wire.infer import DEFAULT_NEW_TOKENS, check_correlation, finite_probabilities, reply_address

log = logging.getLogger("tomtit.serving")

# A full queue answers "busy" at once instead of letting a client wait: 32 requests are 32 training
# steps of waiting at worst (~6 s at MiniLM's 0.2 s/step here; a Pi 4 is slower), and at most
# 32 x 128 KiB of texts in memory.
MAX_QUEUED_REQUESTS = 32
# Prompts per generation request: 4 x 32 tokens is ~10 s of SmolLM2-135M here without a KV cache,
# all of it between two training steps; a client with more prompts sends more requests.
MAX_GENERATE_TEXTS = 4


@dataclass(frozen=True)
class ServeConfig:
    device_id: str  # whose requests we answer: tomtit/{job}/infer/{device_id}/request
    job: str = "default"
    max_queued: int = MAX_QUEUED_REQUESTS  # requests waiting for a gap between steps; more get "busy"
    max_batch_texts: int = MAX_TEXTS_PER_REQUEST  # texts per inference batch, i.e. per training step


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
    errors: dict[str, int] = field(default_factory=dict)  # error replies by reason ("busy" among them)
    unanswerable: int = 0  # no valid reply topic: dropped
    max_queued: int = 0  # the longest the queue got


@dataclass(frozen=True)
class _Pending:
    request: InferRequest
    topic: str  # where to reply
    correlation: bytes | None  # MQTT 5 Correlation Data to echo
    received_at: float


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
        self.stats = ServeStats()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def subscribe(self) -> None:
        # QoS 0: the broker keeps nothing for us while we are offline, so a device coming back
        # does not answer a backlog of requests whose clients gave up long ago.
        self.transport.subscribe(self.request_topic, qos=0)

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
        if problem is None and self.generates and len(request.texts) > MAX_GENERATE_TEXTS:
            problem = WireError("too_many_texts", f"{len(request.texts)} prompts, limit {MAX_GENERATE_TEXTS} per "
                                                  "generation request (each token is a run of the model)")
        if problem is not None:
            self._reply_error(topic, correlation, request_id, problem.reason, problem.detail)
        elif self._unavailable:
            self._reply_error(topic, correlation, request_id, "unavailable", self._unavailable)
        elif len(self._queue) >= self.cfg.max_queued:
            self._reply_error(topic, correlation, request_id, "busy",
                              f"{len(self._queue)} requests are waiting (limit {self.cfg.max_queued}); retry later")
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
        while (self._queue and self._queue[0].request.adapter == kind
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
            probs = softmax(classifier.logits_for_texts(texts, adapter.params, batch_size=len(texts)))
        except Exception as e:  # noqa: BLE001 - a request must never stop training; logged and answered
            log.exception("inference failed on a batch of %d texts", len(texts))
            for p in batch:
                self._reply_error(p.topic, p.correlation, p.request.id, "internal", f"inference failed: {e}")
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
            log.exception("generation failed for a request of %d prompts", len(p.request.texts))
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
                "infer_s": round(s.infer_s, 3), "errors": dict(s.errors), "unanswerable": s.unanswerable,
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

    def _reply_error(self, topic: str, correlation: bytes | None, request_id: str, reason: str, detail: str) -> None:
        self.stats.errors[reason] = self.stats.errors.get(reason, 0) + 1
        self._note(reason, "inference request refused (%s): %s", reason, detail)
        self._send(topic, correlation, error_reply(self.cfg.device_id, reason, detail, request_id))

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

    def _note(self, reason: str, fmt: str, *args) -> None:
        """A warning the first time per reason, then debug: a flood of bad requests must not flood the log."""
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        log.log(level, fmt, *args)
