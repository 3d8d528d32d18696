"""Aggregation: how a node turns its children's adapter updates into one step of its own model.

Everything here is a pure function (or a small state machine) over typed values: no MQTT, no
files, no clock. Time arrives as a ``now`` argument, so the live node, the virtual-clock
simulator and the tests drive the very same code.

Vocabulary
----------
- The adapter is ONE flat float32 vector (the "adapter buffer"); the manifest maps it to named
  tensors elsewhere. An update carries ``delta = new_params - base_params`` in that layout.
- ``num_samples`` weights an update (FedAvg); ``local_steps`` normalises it (FedNova).
- A node's *version* counts the aggregates it has applied. An update was trained from the node
  model of version ``base_version``.

Staleness is counted in the receiving node's versions only, never compounded across tiers
-------------------------------------------------------------------------------------------
``staleness = node_version - base_version``, both numbers being the RECEIVING node's versions.
When an edge forwards its aggregate upward, the parent sees one fresh update whose
``base_version`` is the parent version the edge last synced from; how stale the edge's own
children were is not carried along and not discounted again.

Why: each tier's discount already decided how much a stale child counts *among its siblings*.
Discounting again at the parent punishes the same lag twice. In simulation, multiplicative
staleness discounts at both tiers shrank every update to ~0.37x and made the whole system 2x
*slower* than HierFAVG. For the same reason the weights inside a buffer are normalised to sum to
one (see ``AsyncBuffer``): the discount re-weights updates against each other and never shrinks
the step as a whole.

Numerics: arithmetic runs in float64 and the result is cast back to float32; a result that does
not fit float32 is an error rather than a silent ``inf``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import numpy as np

from tomtit.errors import TomtitError

Inner = Literal["fedavg", "fednova", "median", "trimmed"]


class AggregationError(TomtitError, ValueError):
    """Updates or settings that cannot be aggregated (empty, mismatched, non-finite, bad option)."""


class StaleUpdateError(AggregationError):
    """An update built on a node model too many versions old; the node rejects it with this reason."""


# ---------------------------------------------------------------------------------------------
# Typed values


# eq=False: dataclass equality would compare numpy arrays elementwise and raise; identity is what
# a value holding a large buffer should compare by.
@dataclass(frozen=True, eq=False)
class ChildUpdate:
    """One child's contribution, already decoded and checked against the manifest by the node."""

    update_id: str  # uuid; the node drops redeliveries by it
    sender: str  # child id, equal to the topic's {child}
    delta: np.ndarray  # float32, flat: new_params - base_params
    num_samples: int  # examples trained on since the child's last sync (FedAvg weight)
    local_steps: int  # optimiser steps since the last sync (FedNova's tau)
    base_version: int  # the receiving node's model version this update started from
    train_loss: float  # the child's smoothed training loss; feeds the edge's own sync rule

    def __post_init__(self) -> None:
        # Shape and metadata only; whether the numbers are finite is checked where they are used
        # (aggregation and AsyncBuffer.add), so one bad update is refused, not a whole buffer.
        if not isinstance(self.update_id, str) or not self.update_id:
            raise AggregationError("ChildUpdate.update_id must be a non-empty string")
        if not isinstance(self.sender, str) or not self.sender:
            raise AggregationError("ChildUpdate.sender must be a non-empty string")
        _check_int("ChildUpdate.num_samples", self.num_samples, minimum=1)
        _check_int("ChildUpdate.local_steps", self.local_steps, minimum=1)
        _check_int("ChildUpdate.base_version", self.base_version, minimum=0)
        if not _is_real(self.train_loss) or not math.isfinite(self.train_loss):
            raise AggregationError(f"ChildUpdate.train_loss must be a finite number, got {self.train_loss!r}")
        # A read-only view, so nothing downstream edits a buffered update by accident.
        view = _as_vector("ChildUpdate.delta", self.delta).view()
        view.flags.writeable = False
        object.__setattr__(self, "delta", view)


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """What one flush of a buffer produced, with enough bookkeeping to ack, log and forward it."""

    delta: np.ndarray  # float32, already multiplied by server_lr; add it to the node model
    update_ids: tuple[str, ...]  # to ack to the children, in arrival order
    senders: tuple[str, ...]  # same order
    weights: tuple[float, ...]  # each update's share (sums to 1); equal shares for median/trimmed
    staleness: tuple[int, ...]  # node_version - base_version at arrival, same order
    num_samples: int  # total; what this node reports as its own num_samples upward
    mean_train_loss: float  # sample-weighted child loss: the edge's loss for its own sync rule
    waited_s: float  # how long the oldest update sat in the buffer (telemetry)


# ---------------------------------------------------------------------------------------------
# Small numeric helpers


def staleness_weight(staleness: int, exponent: float) -> float:
    """``(1 + s) ** -a``: the relative weight of an update ``s`` versions old (FedBuff uses a=0.5)."""
    _check_int("staleness", staleness, minimum=0)
    _check_float("staleness exponent", exponent, minimum=0.0)
    return float((1.0 + staleness) ** (-exponent))


def clip_by_norm(delta: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale ``delta`` down so its L2 norm is at most ``max_norm``; direction is kept.

    Bounds how far any single child can pull the model. A delta already within bound is returned
    as is (not copied). The norm is taken in float64 so float32 values near 1e38 do not overflow
    to ``inf`` and get clipped to zero instead of to ``max_norm``.
    """
    _check_float("max_norm", max_norm, minimum=0.0, strict=True)
    vec = _finite("delta", _as_vector("delta", delta))
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if norm <= max_norm:
        return vec
    return (vec.astype(np.float64) * (max_norm / norm)).astype(np.float32)


def apply_delta(params: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``params + delta`` as a new float32 vector, refusing mismatched or non-finite inputs."""
    p = _finite("params", _as_vector("params", params))
    d = _finite("delta", _as_vector("delta", delta))
    _same_length(("params", p), ("delta", d))
    return _to_float32(p.astype(np.float64) + d)


def merge_parent_model(parent_params: np.ndarray, local_params: np.ndarray,
                       pushed_params: np.ndarray) -> np.ndarray:
    """An edge's new model when its parent's model arrives: ``parent + (local - pushed)``.

    ``pushed_params`` is the edge model as of its last upward push and ``local_params`` its model
    now. The parent has absorbed (or will absorb) what was pushed, so taking the parent model
    wholesale would throw away the children's updates applied since the push, and keeping the
    local model would ignore the rest of the hierarchy. Re-basing the local progress
    ``local - pushed`` onto the parent model keeps both and counts nothing twice.
    Consequences: if nothing happened locally (local == pushed) the result is the parent model;
    if the parent only echoes our push (parent == pushed) the result is the local model.
    """
    parent = _finite("parent_params", _as_vector("parent_params", parent_params))
    local = _finite("local_params", _as_vector("local_params", local_params))
    pushed = _finite("pushed_params", _as_vector("pushed_params", pushed_params))
    _same_length(("parent_params", parent), ("local_params", local), ("pushed_params", pushed))
    return _to_float32(parent.astype(np.float64) + (local.astype(np.float64) - pushed))


# ---------------------------------------------------------------------------------------------
# Aggregation functions (the Flower habit: plain functions over arrays)


def fedavg(updates: Sequence[ChildUpdate], *, clip_norm: float | None = None) -> np.ndarray:
    """Sample-weighted mean of the deltas (weights ``n_i / sum(n)``)."""
    return _combine("fedavg", updates, _samples(updates), clip_norm=clip_norm)[0]


def fednova(updates: Sequence[ChildUpdate], *, clip_norm: float | None = None) -> np.ndarray:
    """FedNova normalisation for children that took different numbers of local steps.

    Wang et al., NeurIPS 2020, vanilla-SGD case: ``d_i = delta_i / tau_i`` is each child's
    per-step direction, ``p_i = n_i / sum(n)``, ``tau_eff = sum(p_i tau_i)``, and the aggregate
    is ``tau_eff * sum(p_i d_i)``. Plain FedAvg would let a child that ran many steps drag the
    model towards its own local optimum; autonomous sync guarantees step counts differ.
    With Adam (or momentum) local optimisers the per-step direction is not ``delta / tau``
    exactly; dividing by the step count is then the common heuristic, not the exact correction.
    """
    return _combine("fednova", updates, _samples(updates), clip_norm=clip_norm)[0]


def coordinate_median(updates: Sequence[ChildUpdate], *, clip_norm: float | None = None) -> np.ndarray:
    """Per-coordinate median of the deltas, unweighted.

    Unweighted on purpose: a robust statistic must not trust ``num_samples``, which a faulty or
    malicious child reports itself. Tolerates fewer than half of the updates being arbitrary.
    """
    return _combine("median", updates, _samples(updates), clip_norm=clip_norm)[0]


def trimmed_mean(updates: Sequence[ChildUpdate], trim_fraction: float, *,
                 clip_norm: float | None = None) -> np.ndarray:
    """Per coordinate, drop the ``floor(trim_fraction * n)`` lowest and highest values (at least one
    each when ``trim_fraction > 0`` and n >= 3), average the rest.

    Unweighted, like the median, and for the same reason. Raises if nothing would remain.
    """
    return _combine("trimmed", updates, _samples(updates), clip_norm=clip_norm,
                    trim_fraction=trim_fraction)[0]


# ---------------------------------------------------------------------------------------------
# Buffered asynchronous aggregation (FedBuff-like)


@dataclass(frozen=True)
class BufferConfig:
    """When a node applies what its children sent, and how it combines it."""

    k_updates: int = 3  # apply after this many updates: no waiting for the slowest child
    max_wait_s: float = 30.0  # ...or this long after the first buffered one, so a quiet tier still moves
    server_lr: float = 1.0  # scales the combined delta; 1.0 takes the children's mean step as is
    staleness_exponent: float = 0.5  # a in (1+s)^-a; 0.5 as in FedBuff; 0 treats stale as fresh
    # Reject updates older than this: their direction is obsolete. 20, not 10: an edge makes a
    # version every K updates, so while Wi-Fi children sync every few steps a slow-link child's
    # round trip (an 8 s model download on LTE-M) spans 10-15 versions; at 10 those updates were
    # refused and their data never reached the model (docs/evaluation.md §3). The weight
    # (1+s)^-a already discounts them; the bound stays finite, as the convergence analyses need.
    max_staleness: int = 20
    clip_norm: float | None = None  # bound each update's L2 norm before combining (None: off)
    inner: Inner = "fedavg"  # how the buffered deltas are combined
    trim_fraction: float = 0.2  # share trimmed from each end per coordinate; inner="trimmed" only

    def __post_init__(self) -> None:
        _check_int("BufferConfig.k_updates", self.k_updates, minimum=1)
        if not _is_real(self.max_wait_s) or math.isnan(self.max_wait_s) or self.max_wait_s <= 0:
            raise AggregationError(f"BufferConfig.max_wait_s must be > 0 (inf: wait for K), got {self.max_wait_s!r}")
        _check_float("BufferConfig.server_lr", self.server_lr, minimum=0.0, strict=True)
        _check_float("BufferConfig.staleness_exponent", self.staleness_exponent, minimum=0.0)
        _check_int("BufferConfig.max_staleness", self.max_staleness, minimum=0)
        if self.clip_norm is not None:
            _check_float("BufferConfig.clip_norm", self.clip_norm, minimum=0.0, strict=True)
        if self.inner not in get_args(Inner):
            raise AggregationError(f"BufferConfig.inner must be one of {', '.join(get_args(Inner))}; got {self.inner!r}")
        _check_trim_fraction("BufferConfig.trim_fraction", self.trim_fraction)
        # A full buffer that trims nothing is a plain mean in disguise; say so now, not never.
        if self.inner == "trimmed" and _trim_count(self.trim_fraction, self.k_updates) < 1:
            raise AggregationError(
                f"BufferConfig.trim_fraction {self.trim_fraction} x k_updates {self.k_updates} trims no "
                f"update from either end; raise one of them")


@dataclass(frozen=True, eq=False)
class _Pending:
    update: ChildUpdate
    staleness: int
    arrived: float


class AsyncBuffer:
    """Collects child updates; flushes after K of them or T seconds since the first.

    Weights inside a flush are ``num_samples * staleness_weight(s, a)`` normalised to sum to one,
    so the staleness discount only re-weights updates against each other: a buffer holding only
    stale updates moves the model as far as one holding fresh ones. (Median and trimmed mean are
    unweighted; for them only ``max_staleness`` acts on staleness.)

    Staleness is fixed when an update arrives (``node_version`` passed to ``add``). Nothing here
    reads a clock: ``now`` is any monotonic seconds value the caller chooses.
    """

    def __init__(self, config: BufferConfig) -> None:
        self.config = config
        self._pending: list[_Pending] = []
        self._ids: set[str] = set()  # the pending update_ids, for O(1) membership under load

    @property
    def pending(self) -> int:
        """Number of buffered updates."""
        return len(self._pending)

    @property
    def pending_ids(self) -> tuple[str, ...]:
        """update_ids currently buffered (a node ignores re-sends of these until it applies them)."""
        return tuple(p.update.update_id for p in self._pending)

    def __contains__(self, update_id: object) -> bool:
        """Whether an update with this id is buffered (constant time)."""
        return update_id in self._ids

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest buffered update has waited; 0.0 when the buffer is empty."""
        return max(0.0, now - self._pending[0].arrived) if self._pending else 0.0

    def add(self, update: ChildUpdate, node_version: int, now: float) -> None:
        """Buffer ``update``; raise (buffering nothing) if it cannot be aggregated.

        Checked here rather than at flush so that one bad update is refused on its own instead of
        making every later flush fail.
        """
        _check_int("node_version", node_version, minimum=0)
        staleness = node_version - update.base_version
        if staleness < 0:
            raise AggregationError(
                f"update {update.update_id} from {update.sender}: base_version {update.base_version} "
                f"is ahead of this node's version {node_version}")
        if staleness > self.config.max_staleness:
            raise StaleUpdateError(
                f"stale update {update.update_id} from {update.sender}: staleness {staleness} "
                f"(base_version {update.base_version}, node version {node_version}) exceeds "
                f"max_staleness {self.config.max_staleness}")
        _finite(f"update {update.update_id} delta", update.delta)
        if self._pending:
            first = self._pending[0].update
            if update.delta.size != first.delta.size:
                raise AggregationError(
                    f"update {update.update_id} has {update.delta.size} values; the buffered "
                    f"updates have {first.delta.size}")
            if update.update_id in self._ids:
                raise AggregationError(f"update {update.update_id} is already buffered")
        self._pending.append(_Pending(update, staleness, float(now)))
        self._ids.add(update.update_id)

    def deadline(self) -> float | None:
        """When the first buffered update will have waited ``max_wait_s`` (None: empty).
        ``ready`` compares ``now`` with exactly this value, so a timer set for it always fires a
        flush (``now - arrived >= max_wait`` can round the other way at that instant)."""
        return self._pending[0].arrived + self.config.max_wait_s if self._pending else None

    def ready(self, now: float) -> bool:
        """True once K updates are buffered, or the first has waited ``max_wait_s``."""
        if not self._pending:
            return False
        return len(self._pending) >= self.config.k_updates or now >= self.deadline()

    def flush(self, now: float) -> AggregateResult:
        """Combine and empty the buffer (whether or not ``ready``: a node may flush on shutdown).

        If combining fails (only a float32 overflow can, since ``add`` checked every update) the
        error propagates and the buffer is left as it was; a ``clip_norm`` rules this out.
        """
        if not self._pending:
            raise AggregationError("nothing to flush: the buffer is empty")
        cfg = self.config
        updates = [p.update for p in self._pending]
        staleness = tuple(p.staleness for p in self._pending)
        base = np.array([u.num_samples * staleness_weight(s, cfg.staleness_exponent)
                         for u, s in zip(updates, staleness)], dtype=np.float64)
        delta, weights = _combine(cfg.inner, updates, base, clip_norm=cfg.clip_norm,
                                  trim_fraction=cfg.trim_fraction, checked=True)
        samples = _samples(updates)
        result = AggregateResult(
            # delta is float32 already; server_lr 1.0 (the default) leaves it as is
            delta=delta if cfg.server_lr == 1.0 else _to_float32(delta.astype(np.float64) * cfg.server_lr),
            update_ids=tuple(u.update_id for u in updates),
            senders=tuple(u.sender for u in updates),
            weights=tuple(float(w) for w in weights),
            staleness=staleness,
            num_samples=int(samples.sum()),
            mean_train_loss=float(np.dot(samples / samples.sum(), [u.train_loss for u in updates])),
            waited_s=self.oldest_age(now),
        )
        self._pending = []
        self._ids = set()
        return result


# ---------------------------------------------------------------------------------------------
# Combiners: one uniform signature, chosen by name through a table (no if/elif on strings).
# Each takes float32 deltas (rows), local steps, positive relative weights and the trim fraction,
# and returns the float64 aggregate plus the normalised weights it actually used. All arithmetic
# is float64; the mean combiners widen each row inside the multiply (no float64 copy of every row).

_Combiner = Callable[[list[np.ndarray], np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def _mean_combiner(deltas: list[np.ndarray], steps: np.ndarray, weights: np.ndarray,
                   trim_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    p = _normalise(weights)
    return _weighted_sum(p, deltas), p


_ROWS_PER_GEMV = 16  # bounds the float64 copy of the rows (16 MiniLM adapters = 9.7 MB)


def _weighted_sum(weights: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """sum_i weights[i] * rows[i] in float64: one matrix-vector product per block of rows, ~1.6x
    faster than a multiply and an add per row (one pass over the data instead of three)."""
    acc = np.zeros(rows[0].size, dtype=np.float64)
    for i in range(0, len(rows), _ROWS_PER_GEMV):
        acc += weights[i:i + _ROWS_PER_GEMV] @ np.array(rows[i:i + _ROWS_PER_GEMV], dtype=np.float64)
    return acc


def _nova_combiner(deltas: list[np.ndarray], steps: np.ndarray, weights: np.ndarray,
                   trim_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    p = _normalise(weights)
    tau_eff = float(np.dot(p, steps))
    return tau_eff * _weighted_sum(p / steps, deltas), p


def _median_combiner(deltas: list[np.ndarray], steps: np.ndarray, weights: np.ndarray,
                     trim_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    return np.median(np.stack(deltas).astype(np.float64), axis=0), np.full(len(deltas), 1.0 / len(deltas))


def _trimmed_combiner(deltas: list[np.ndarray], steps: np.ndarray, weights: np.ndarray,
                      trim_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    _check_trim_fraction("trim_fraction", trim_fraction)
    n = len(deltas)
    k = _trim_count(trim_fraction, n)
    if k == 0 and trim_fraction > 0 and n >= 3:
        # A buffer flushed by its timer holds fewer than K updates, where floor(fraction x n) can be
        # 0: a poisoned update would then pass untrimmed. Trimming asked for means at least one.
        k = 1
    if n - 2 * k < 1:
        raise AggregationError(
            f"trim_fraction {trim_fraction} trims {k} of {n} updates from each end; nothing would remain")
    ordered = np.sort(np.stack(deltas).astype(np.float64), axis=0)
    return ordered[k:n - k].mean(axis=0), np.full(n, 1.0 / n)


_COMBINERS: dict[str, _Combiner] = {
    "fedavg": _mean_combiner,
    "fednova": _nova_combiner,
    "median": _median_combiner,
    "trimmed": _trimmed_combiner,
}
assert set(_COMBINERS) == set(get_args(Inner))


def _combine(inner: str, updates: Sequence[ChildUpdate], weights: np.ndarray, *,
             clip_norm: float | None, trim_fraction: float = 0.0,
             checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate, optionally clip each update, combine; returns (float32 delta, normalised weights).

    ``checked``: the caller already verified every delta is finite (AsyncBuffer.add did).
    """
    if len(updates) == 0:
        raise AggregationError("no updates to aggregate")
    deltas = []
    for u in updates:
        d = u.delta if checked else _finite(f"update {u.update_id} delta", u.delta)
        if clip_norm is not None:
            d = clip_by_norm(d, clip_norm)
        deltas.append(d)
    sizes = {d.size for d in deltas}
    if len(sizes) > 1:
        raise AggregationError(f"updates disagree in length: {sorted(sizes)}")
    steps = np.array([u.local_steps for u in updates], dtype=np.float64)
    delta, used = _COMBINERS[inner](deltas, steps, np.asarray(weights, dtype=np.float64), trim_fraction)
    return _to_float32(delta), used


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _samples(updates: Sequence[ChildUpdate]) -> np.ndarray:
    return np.array([u.num_samples for u in updates], dtype=np.float64)


def _normalise(weights: np.ndarray) -> np.ndarray:
    total = float(weights.sum())
    if not math.isfinite(total) or total <= 0 or np.any(weights < 0):
        raise AggregationError(f"weights must be non-negative with a positive finite sum, got {weights}")
    return weights / total


def _trim_count(trim_fraction: float, n: int) -> int:
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from trimming 28 instead of 29.
    return math.floor(trim_fraction * n + 1e-9)


def _check_trim_fraction(name: str, value: float) -> None:
    if not _is_real(value) or not 0.0 <= value <= 0.5:
        raise AggregationError(f"{name} must be in [0, 0.5], got {value!r}")


def _as_vector(name: str, x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise AggregationError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise AggregationError(f"{name} must be float32 (convert at the decoder), got {x.dtype}")
    if x.ndim != 1 or x.size == 0:
        raise AggregationError(f"{name} must be a non-empty flat vector, got shape {x.shape}")
    return x


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise AggregationError(f"{name} has non-finite values (NaN or inf)")
    return x


def _same_length(*named: tuple[str, np.ndarray]) -> None:
    if len({x.size for _, x in named}) > 1:
        raise AggregationError("length mismatch: " + ", ".join(f"{n}={x.size}" for n, x in named))


def _to_float32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise AggregationError("aggregate overflows float32 (are the updates' norms bounded?)")
    return out


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise AggregationError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: object, *, minimum: float, strict: bool = False) -> None:
    ok = _is_real(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise AggregationError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Strategy selection
#
# Every strategy is an AsyncBuffer: the node code is the same whichever is chosen; only when it
# flushes (K, T) and how it combines (inner) differ. Two families:
# - "fedavg" is the synchronous baseline: K = the number of expected children, a long timeout so a
#   dead child cannot stall the tier forever, no staleness discount, and an update one round late
#   still counts (rejecting it would waste the energy the child spent on it).
# - the others are buffered-asynchronous (FedBuff-like): a small K so the tier never waits for its
#   slowest child, which was where most of the simulated speed and energy gain came from.
#   "fednova" is asynchronous too because autonomous sync is what makes step counts differ.
#   "median"/"trimmed" buffer more updates (5), since a robust statistic over 3 protects little.
# ``expected_children`` sets K for "fedavg" (required) and caps K for the others, so a node with
# two children does not routinely wait for a timeout. Any other option overrides a BufferConfig
# field by name.

_BUFFERED = BufferConfig(k_updates=3, max_wait_s=30.0, staleness_exponent=0.5)

_STRATEGY_DEFAULTS: dict[str, BufferConfig] = {
    "fedbuff": _BUFFERED,
    # k_updates=1 is a placeholder: make_strategy sets K from expected_children (or k_updates).
    "fedavg": replace(_BUFFERED, k_updates=1, max_wait_s=600.0, staleness_exponent=0.0, max_staleness=1),
    "fednova": replace(_BUFFERED, inner="fednova"),
    "median": replace(_BUFFERED, inner="median", k_updates=5),
    "trimmed": replace(_BUFFERED, inner="trimmed", k_updates=5, trim_fraction=0.2),
}

STRATEGIES: tuple[str, ...] = tuple(_STRATEGY_DEFAULTS)


def make_strategy(name: str, *, expected_children: int | None = None, **opts: object) -> AsyncBuffer:
    """An ``AsyncBuffer`` configured for the strategy ``name``; ``opts`` override BufferConfig fields."""
    if name not in _STRATEGY_DEFAULTS:
        raise AggregationError(f"unknown aggregation strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    known = {f.name for f in fields(BufferConfig)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise AggregationError(
            f"unknown option(s) {', '.join(unknown)} for strategy {name!r}; valid: "
            f"expected_children, {', '.join(sorted(known))}")
    config = _STRATEGY_DEFAULTS[name]
    changes: dict[str, object] = {}
    if expected_children is not None:
        _check_int("expected_children", expected_children, minimum=1)
        changes["k_updates"] = (expected_children if name == "fedavg"
                                else min(config.k_updates, expected_children))
    elif name == "fedavg" and "k_updates" not in opts:
        raise AggregationError("strategy 'fedavg' waits for every child: give expected_children (or k_updates)")
    changes.update(opts)  # an explicit option wins over what expected_children implies
    k_updates = changes.get("k_updates", config.k_updates)
    if (name == "trimmed" and "trim_fraction" not in opts and isinstance(k_updates, int) and k_updates >= 3
            and _trim_count(config.trim_fraction, k_updates) < 1):
        # An edge with 3 or 4 children caps K below 5, where the default 0.2 trims nothing (a plain
        # mean in disguise, which BufferConfig refuses): trim one update from each end instead.
        changes["trim_fraction"] = 1.0 / k_updates
    return AsyncBuffer(replace(config, **changes))  # one replace: validated once, as a whole
