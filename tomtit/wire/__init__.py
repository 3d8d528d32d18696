"""The wire format: every MQTT topic and every payload that crosses a broker (DESIGN.md §3, §8).

Everything travels in topic + payload so MQTT 3.1.1 is enough. Models and updates are
safetensors bytes with string metadata; acks, presence, telemetry, error reports and the run
configuration are small JSON objects. Nothing here is ever unpickled or eval'd: a payload comes
from a device we do not control, so decoding is bounded in size and validated field by field
before anything is used.

This package only checks what one message says about itself. Whether an update is worth
applying (norm bound, staleness, update_id seen before) is the receiving node's decision.

One module per job; import from `tomtit.wire`, which re-exports the public names:
  - errors:     WireError, ids, and the checks the other modules share;
  - topics:     Topics, every topic of a job;
  - codec:      ModelMessage, encode_message, decode_message (safetensors, f32/f16/int8);
  - flat:       FlatDecoder, decode_message straight into one flat buffer (node hot path);
  - chunks:     split_payload, is_chunk, Reassembler, for payloads above the broker's limit;
  - control:    acks, presence, error reports, telemetry (small JSON);
  - run_config: RunConfig, the run's settings the cloud publishes retained (small JSON);
  - infer:      InferRequest, InferReply, served inference between a client and a device (small JSON).
"""
from tomtit.wire.chunks import CHUNK_HEADER_MAX, MIN_CHUNK_LIMIT, Reassembler, is_chunk, split_payload
from tomtit.wire.codec import (CODECS, KINDS, MAX_ABS_LOSS, MAX_CREATED_AT, MAX_ENERGY_J, MAX_LOCAL_STEPS,
                               MAX_NUM_SAMPLES, MAX_VERSION, PROTO, SCALE_SUFFIX, ModelMessage, decode_message,
                               encode_message)
from tomtit.wire.control import (ACK_STATUSES, MAX_ACK_BATCH_BYTES, MAX_ACKS_PER_MESSAGE, MAX_DETAIL_CHARS,
                                 MAX_SMALL_JSON_BYTES, MAX_TELEMETRY_BYTES, PRESENCE_STATES, Ack, ErrorReport,
                                 Presence, TelemetryValue, decode_ack, decode_acks, decode_error,
                                 decode_presence, decode_telemetry, encode_ack, encode_acks, encode_error,
                                 encode_presence, encode_telemetry)
from tomtit.wire.errors import WireError, check_id, new_update_id
from tomtit.wire.flat import FlatDecoder
from tomtit.wire.infer import (ADAPTER_KINDS, MAX_REPLY_BYTES, MAX_REQUEST_BYTES,
                               MAX_TEXT_CHARS, MAX_TEXTS_PER_REQUEST, InferReply, InferRequest, InferResult,
                               decode_reply, decode_request, encode_reply, encode_request, error_reply,
                               reply_topic, reply_topic_hint)
from tomtit.wire.run_config import RunConfig, decode_run_config, encode_run_config
from tomtit.wire.topics import Topics

__all__ = [
    # errors and ids
    "WireError", "check_id", "new_update_id",
    # topics
    "Topics",
    # model and update messages
    "PROTO", "KINDS", "CODECS", "SCALE_SUFFIX", "ModelMessage", "encode_message", "decode_message",
    "MAX_VERSION", "MAX_NUM_SAMPLES", "MAX_LOCAL_STEPS", "MAX_ABS_LOSS", "MAX_ENERGY_J", "MAX_CREATED_AT",
    "FlatDecoder",
    # chunks
    "MIN_CHUNK_LIMIT", "CHUNK_HEADER_MAX", "split_payload", "is_chunk", "Reassembler",
    # small JSON control messages
    "MAX_SMALL_JSON_BYTES", "MAX_TELEMETRY_BYTES", "MAX_DETAIL_CHARS", "MAX_ACKS_PER_MESSAGE",
    "MAX_ACK_BATCH_BYTES", "ACK_STATUSES", "PRESENCE_STATES", "Ack", "Presence", "ErrorReport",
    "encode_ack", "decode_ack", "encode_acks", "decode_acks", "encode_presence", "decode_presence",
    "encode_error", "decode_error", "TelemetryValue", "encode_telemetry", "decode_telemetry",
    # run configuration
    "RunConfig", "encode_run_config", "decode_run_config",
    # served inference
    "ADAPTER_KINDS", "MAX_TEXTS_PER_REQUEST", "MAX_TEXT_CHARS", "MAX_REQUEST_BYTES", "MAX_REPLY_BYTES",
    "InferRequest", "InferReply", "InferResult", "encode_request", "decode_request",
    "encode_reply", "decode_reply", "error_reply", "reply_topic", "reply_topic_hint",
]
