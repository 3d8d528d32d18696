"""Aggregation tests. Every expected value is computed independently here with plain numpy
(np.average, np.median, a sorted slice, the FedNova formula written out) or by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_broker.aggregation import (
    STRATEGIES,
    AggregateResult,
    AggregationError,
    AsyncBuffer,
    BufferConfig,
    ChildUpdate,
    StaleUpdateError,
    apply_delta,
    clip_by_norm,
    coordinate_median,
    fedavg,
    fednova,
    make_strategy,
    merge_parent_model,
    staleness_weight,
    trimmed_mean,
)
from tomtit.errors import TomtitError

RTOL = 1e-6
ATOL = 1e-6


def upd(delta, *, n=1, steps=1, base=0, loss=1.0, uid=None, sender=None) -> ChildUpdate:
    upd.counter += 1
    return ChildUpdate(
        update_id=uid or f"u{upd.counter}",
        sender=sender or f"dev{upd.counter}",
        delta=np.asarray(delta, dtype=np.float32),
        num_samples=n,
        local_steps=steps,
        base_version=base,
        train_loss=loss,
    )


upd.counter = 0


def random_updates(rng: np.random.Generator, count: int, size: int) -> list[ChildUpdate]:
    return [upd(rng.normal(size=size), n=int(rng.integers(1, 500)), steps=int(rng.integers(1, 50)),
                loss=float(rng.uniform(0.1, 3.0)))
            for _ in range(count)]


def stack(updates):
    return np.stack([u.delta.astype(np.float64) for u in updates])


# ---------------------------------------------------------------------------------------------
# fedavg / fednova / median / trimmed: hand-made and random


def test_fedavg_hand_made():
    us = [upd([1.0, 0.0], n=1), upd([0.0, 4.0], n=3)]
    # by hand: 1/4 * [1, 0] + 3/4 * [0, 4]
    np.testing.assert_allclose(fedavg(us), [0.25, 3.0], rtol=RTOL)
    assert fedavg(us).dtype == np.float32


def test_fedavg_random_matches_np_average():
    rng = np.random.default_rng(0)
    us = random_updates(rng, 7, 1000)
    expected = np.average(stack(us), axis=0, weights=[u.num_samples for u in us])
    np.testing.assert_allclose(fedavg(us), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("count", [15, 16, 17, 40])
def test_many_updates_match_too(count):
    """Rows are combined in blocks of 16: counts around and past a block edge."""
    rng = np.random.default_rng(count)
    us = random_updates(rng, count, 300)
    expected = np.average(stack(us), axis=0, weights=[u.num_samples for u in us])
    np.testing.assert_allclose(fedavg(us), expected, rtol=RTOL, atol=ATOL)
    n = np.array([u.num_samples for u in us], dtype=np.float64)
    tau = np.array([u.local_steps for u in us], dtype=np.float64)
    p = n / n.sum()
    nova = (p @ tau) * (p[:, None] * (stack(us) / tau[:, None])).sum(axis=0)
    np.testing.assert_allclose(fednova(us), nova, rtol=RTOL, atol=ATOL)


def test_fednova_hand_made():
    us = [upd([2.0], n=1, steps=1), upd([4.0], n=3, steps=4)]
    # d = (2, 1); p = (.25, .75); tau_eff = .25*1 + .75*4 = 3.25; sum p d = .5 + .75 = 1.25
    np.testing.assert_allclose(fednova(us), [3.25 * 1.25], rtol=RTOL)
    # fedavg would say .25*2 + .75*4 = 3.5: the many-step child counts less under FedNova
    np.testing.assert_allclose(fedavg(us), [3.5], rtol=RTOL)


def test_fednova_random_matches_formula():
    rng = np.random.default_rng(1)
    us = random_updates(rng, 6, 500)
    n = np.array([u.num_samples for u in us], dtype=np.float64)
    tau = np.array([u.local_steps for u in us], dtype=np.float64)
    p = n / n.sum()
    d = stack(us) / tau[:, None]
    expected = (p @ tau) * (p[:, None] * d).sum(axis=0)
    np.testing.assert_allclose(fednova(us), expected, rtol=RTOL, atol=ATOL)


def test_fednova_equals_fedavg_when_steps_equal():
    rng = np.random.default_rng(2)
    us = [upd(rng.normal(size=50), n=int(rng.integers(1, 100)), steps=7) for _ in range(5)]
    np.testing.assert_allclose(fednova(us), fedavg(us), rtol=1e-5, atol=ATOL)


def test_median_hand_made_odd_and_even():
    odd = [upd([1.0, 9.0]), upd([5.0, -1.0]), upd([3.0, 2.0])]
    np.testing.assert_allclose(coordinate_median(odd), [3.0, 2.0])
    even = odd + [upd([100.0, 0.0])]
    np.testing.assert_allclose(coordinate_median(even), [4.0, 1.0])  # means of the middle pair


def test_median_ignores_num_samples():
    us = [upd([0.0], n=1), upd([1.0], n=1), upd([50.0], n=10_000)]
    np.testing.assert_allclose(coordinate_median(us), [1.0])


def test_median_random_matches_np_median():
    rng = np.random.default_rng(3)
    us = random_updates(rng, 8, 300)
    np.testing.assert_allclose(coordinate_median(us), np.median(stack(us), axis=0), rtol=RTOL, atol=ATOL)


def test_trimmed_mean_hand_made():
    us = [upd([v]) for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]
    # 0.2 * 5 = 1 trimmed from each end -> mean(1, 2, 3)
    np.testing.assert_allclose(trimmed_mean(us, 0.2), [2.0])
    np.testing.assert_allclose(trimmed_mean(us, 0.0), [np.mean([-100, 1, 2, 3, 100])], rtol=RTOL)


@pytest.mark.parametrize("fraction, count", [(0.25, 8), (0.1, 10), (0.2, 7), (0.5, 5)])
def test_trimmed_mean_random_matches_sorted_slice(fraction, count):
    rng = np.random.default_rng(4)
    us = random_updates(rng, count, 200)
    k = {(0.25, 8): 2, (0.1, 10): 1, (0.2, 7): 1, (0.5, 5): 2}[(fraction, count)]  # floor(f*n) by hand
    expected = np.sort(stack(us), axis=0)[k:count - k].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(us, fraction), expected, rtol=RTOL, atol=ATOL)


def test_trimmed_mean_refuses_when_nothing_remains():
    us = [upd([1.0]), upd([2.0])]
    with pytest.raises(AggregationError, match="nothing would remain"):
        trimmed_mean(us, 0.5)


@pytest.mark.parametrize("fraction", [-0.1, 0.51, float("nan"), 1.0])
def test_trimmed_mean_bad_fraction(fraction):
    with pytest.raises(AggregationError, match="trim_fraction"):
        trimmed_mean([upd([1.0]), upd([2.0]), upd([3.0])], fraction)


# ---------------------------------------------------------------------------------------------
# Bad inputs


AGGREGATORS = {
    "fedavg": fedavg,
    "fednova": fednova,
    "median": coordinate_median,
    "trimmed": lambda us, **kw: trimmed_mean(us, 0.0, **kw),
}


@pytest.mark.parametrize("name", AGGREGATORS)
def test_empty_input_raises(name):
    with pytest.raises(AggregationError, match="no updates"):
        AGGREGATORS[name]([])


@pytest.mark.parametrize("name", AGGREGATORS)
def test_length_mismatch_raises(name):
    with pytest.raises(AggregationError, match="length"):
        AGGREGATORS[name]([upd([1.0, 2.0]), upd([1.0, 2.0, 3.0])])


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(name, bad):
    with pytest.raises(AggregationError, match="non-finite"):
        AGGREGATORS[name]([upd([1.0, 2.0]), upd([bad, 2.0])])


def test_errors_are_tomtit_errors():
    assert issubclass(AggregationError, TomtitError)
    assert issubclass(StaleUpdateError, AggregationError)


def test_overflowing_aggregate_raises_instead_of_inf():
    big = np.finfo(np.float32).max
    # 0.5*max + 0.5*max fits, but fednova with tau_eff > tau of the big update does not
    us = [upd([big], n=1, steps=1), upd([0.0], n=1, steps=100)]
    with pytest.raises(AggregationError, match="overflows float32"):
        fednova(us)


@pytest.mark.parametrize("kwargs, field", [
    ({"delta": np.zeros((2, 2), np.float32)}, "delta"),
    ({"delta": np.zeros(0, np.float32)}, "delta"),
    ({"delta": np.zeros(3, np.float64)}, "float32"),
    ({"delta": [0.0, 1.0]}, "numpy array"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"local_steps": 0}, "local_steps"),
    ({"base_version": -1}, "base_version"),
    ({"train_loss": float("nan")}, "train_loss"),
    ({"update_id": ""}, "update_id"),
    ({"sender": ""}, "sender"),
])
def test_child_update_validates_its_fields(kwargs, field):
    base = dict(update_id="u", sender="s", delta=np.zeros(3, np.float32), num_samples=1,
                local_steps=1, base_version=0, train_loss=0.5)
    with pytest.raises(AggregationError, match=field):
        ChildUpdate(**{**base, **kwargs})


def test_child_update_delta_is_read_only():
    u = upd([1.0, 2.0])
    with pytest.raises(ValueError):
        u.delta[0] = 5.0


# ---------------------------------------------------------------------------------------------
# Clipping


def test_clip_by_norm_scales_long_vectors_to_the_bound():
    d = np.array([3.0, 4.0], dtype=np.float32)  # norm 5
    out = clip_by_norm(d, 1.0)
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=RTOL)
    assert out.dtype == np.float32


def test_clip_by_norm_keeps_short_vectors():
    d = np.array([0.3, 0.4], dtype=np.float32)
    np.testing.assert_array_equal(clip_by_norm(d, 1.0), d)


def test_clip_by_norm_handles_float32_extremes():
    d = np.full(4, 1e38, dtype=np.float32)  # squared sum overflows float32
    out = clip_by_norm(d, 2.0)
    np.testing.assert_allclose(out, [1.0, 1.0, 1.0, 1.0], rtol=RTOL)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_by_norm_bad_bound(bad):
    with pytest.raises(AggregationError, match="max_norm"):
        clip_by_norm(np.ones(2, np.float32), bad)


def test_clip_by_norm_refuses_nan():
    with pytest.raises(AggregationError, match="non-finite"):
        clip_by_norm(np.array([np.nan, 1.0], np.float32), 1.0)


def test_strategies_clip_each_update_before_combining():
    rng = np.random.default_rng(5)
    us = [upd(rng.normal(size=20) * scale, n=int(rng.integers(1, 9))) for scale in (0.01, 1.0, 100.0)]
    clipped = []
    for u in us:
        d = u.delta.astype(np.float64)
        norm = np.sqrt((d ** 2).sum())
        clipped.append(d * min(1.0, 0.5 / norm))
    clipped = np.stack(clipped)
    n = [u.num_samples for u in us]
    np.testing.assert_allclose(fedavg(us, clip_norm=0.5), np.average(clipped, axis=0, weights=n),
                               rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(coordinate_median(us, clip_norm=0.5), np.median(clipped, axis=0),
                               rtol=1e-5, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Staleness weight


def test_staleness_weight_values():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)  # 4 ** -0.5
    assert staleness_weight(1, 2.0) == pytest.approx(0.25)
    assert staleness_weight(9, 0.0) == 1.0


def test_staleness_weight_decreases_with_staleness():
    ws = [staleness_weight(s, 0.5) for s in range(10)]
    assert all(a > b for a, b in zip(ws, ws[1:]))


@pytest.mark.parametrize("s, a", [(-1, 0.5), (1, -0.5), (1, float("nan")), (1.5, 0.5)])
def test_staleness_weight_bad_params(s, a):
    with pytest.raises(AggregationError):
        staleness_weight(s, a)


# ---------------------------------------------------------------------------------------------
# AsyncBuffer


def cfg(**kw) -> BufferConfig:
    return BufferConfig(**{"k_updates": 3, "max_wait_s": 10.0, **kw})


def test_buffer_ready_after_k_updates():
    buf = AsyncBuffer(cfg(k_updates=3, max_wait_s=math.inf))
    for i in range(2):
        buf.add(upd([1.0]), node_version=0, now=float(i))
        assert not buf.ready(now=1000.0)
    buf.add(upd([1.0]), node_version=0, now=2.0)
    assert buf.ready(now=2.0)
    assert buf.pending == 3


def test_buffer_ready_after_max_wait_since_first_update():
    buf = AsyncBuffer(cfg(k_updates=5, max_wait_s=10.0))
    assert not buf.ready(now=1e9)  # empty is never ready
    assert buf.oldest_age(now=50.0) == 0.0
    buf.add(upd([1.0]), node_version=0, now=100.0)
    buf.add(upd([1.0]), node_version=0, now=108.0)
    assert buf.oldest_age(now=105.0) == pytest.approx(5.0)
    assert not buf.ready(now=109.9)
    assert buf.ready(now=110.0)  # measured from the first update, not the latest


def test_flush_empties_the_buffer_and_resets_the_clock():
    buf = AsyncBuffer(cfg(k_updates=2, max_wait_s=10.0))
    buf.add(upd([1.0]), node_version=0, now=0.0)
    result = buf.flush(now=4.0)
    assert result.waited_s == pytest.approx(4.0)
    assert buf.pending == 0 and not buf.ready(now=100.0)
    buf.add(upd([1.0]), node_version=1, now=100.0)
    assert not buf.ready(now=105.0)
    with pytest.raises(AggregationError, match="empty"):
        AsyncBuffer(cfg()).flush(now=0.0)


def test_buffer_rejects_beyond_max_staleness_and_keeps_nothing():
    buf = AsyncBuffer(cfg(max_staleness=2))
    buf.add(upd([1.0], base=3), node_version=5, now=0.0)  # staleness 2: accepted
    with pytest.raises(StaleUpdateError, match="stale"):
        buf.add(upd([1.0], base=2), node_version=5, now=0.0)
    assert buf.pending == 1


def test_buffer_rejects_base_version_from_the_future():
    with pytest.raises(AggregationError, match="ahead"):
        AsyncBuffer(cfg()).add(upd([1.0], base=4), node_version=3, now=0.0)


def test_buffer_refuses_bad_update_alone():
    buf = AsyncBuffer(cfg())
    buf.add(upd([1.0, 2.0], uid="a"), node_version=0, now=0.0)
    with pytest.raises(AggregationError, match="non-finite"):
        buf.add(upd([np.nan, 2.0]), node_version=0, now=0.0)
    with pytest.raises(AggregationError, match="values"):
        buf.add(upd([1.0, 2.0, 3.0]), node_version=0, now=0.0)
    with pytest.raises(AggregationError, match="already buffered"):
        buf.add(upd([1.0, 2.0], uid="a"), node_version=0, now=0.0)
    assert buf.pending == 1
    np.testing.assert_allclose(buf.flush(now=1.0).delta, [1.0, 2.0])


def test_flush_weights_staleness_and_metadata():
    a = 0.5
    buf = AsyncBuffer(cfg(staleness_exponent=a, server_lr=0.7))
    items = [  # (delta, n, base, loss); node_version 4
        ([1.0, 0.0], 10, 4, 2.0),
        ([0.0, 1.0], 30, 1, 1.0),
        ([2.0, 2.0], 20, 2, 0.5),
    ]
    us = []
    for i, (d, n, base, loss) in enumerate(items):
        u = upd(d, n=n, base=base, loss=loss, uid=f"id{i}", sender=f"s{i}")
        us.append(u)
        buf.add(u, node_version=4, now=float(i))
    result = buf.flush(now=10.0)
    assert isinstance(result, AggregateResult)
    stale = [0, 3, 2]
    raw = np.array([10 * 1.0 ** -a, 30 * 4.0 ** -a, 20 * 3.0 ** -a])
    expected_w = raw / raw.sum()
    np.testing.assert_allclose(result.weights, expected_w, rtol=1e-12)
    expected_delta = 0.7 * np.average(stack(us), axis=0, weights=raw)
    np.testing.assert_allclose(result.delta, expected_delta, rtol=RTOL)
    assert result.staleness == tuple(stale)
    assert result.update_ids == ("id0", "id1", "id2")
    assert result.senders == ("s0", "s1", "s2")
    assert result.num_samples == 60
    assert result.mean_train_loss == pytest.approx(np.average([2.0, 1.0, 0.5], weights=[10, 30, 20]))


def test_fresher_updates_weigh_more():
    buf = AsyncBuffer(cfg(k_updates=4, staleness_exponent=1.0))
    for base in (5, 3, 4, 0):  # node_version 5 -> staleness 0, 2, 1, 5
        buf.add(upd([1.0], n=100, base=base), node_version=5, now=0.0)
    w = buf.flush(now=0.0).weights
    assert w[0] > w[2] > w[1] > w[3]
    assert sum(w) == pytest.approx(1.0)


@given(staleness=st.lists(st.integers(0, 10), min_size=1, max_size=6),
       exponent=st.floats(0.0, 3.0),
       n=st.integers(1, 1000))
@settings(max_examples=60, deadline=None)
def test_all_stale_buffer_moves_as_far_as_a_fresh_one(staleness, exponent, n):
    delta = np.linspace(-1.0, 2.0, 16, dtype=np.float32)
    fresh, stale = (AsyncBuffer(cfg(k_updates=10, staleness_exponent=exponent)) for _ in range(2))
    for s in staleness:
        fresh.add(upd(delta, n=n, base=10), node_version=10, now=0.0)
        stale.add(upd(delta, n=n, base=10 - s), node_version=10, now=0.0)
    step_fresh = np.linalg.norm(fresh.flush(now=0.0).delta)
    step_stale = np.linalg.norm(stale.flush(now=0.0).delta)
    assert step_stale == pytest.approx(step_fresh, rel=1e-6)
    assert step_fresh == pytest.approx(np.linalg.norm(delta.astype(np.float64)), rel=1e-6)


def test_buffer_fednova_inner_uses_staleness_weights():
    a = 1.0
    buf = AsyncBuffer(cfg(inner="fednova", staleness_exponent=a))
    us = [upd([4.0, 0.0], n=10, steps=2, base=2), upd([0.0, 9.0], n=10, steps=9, base=0)]
    for u in us:
        buf.add(u, node_version=2, now=0.0)
    p = np.array([10 * 1.0, 10 * 3.0 ** -a])
    p /= p.sum()
    tau = np.array([2.0, 9.0])
    expected = (p @ tau) * (p[:, None] * stack(us) / tau[:, None]).sum(axis=0)
    np.testing.assert_allclose(buf.flush(now=0.0).delta, expected, rtol=RTOL)


def test_buffer_median_and_trimmed_inner_are_unweighted():
    us = [upd([v], n=n) for v, n in ((0.0, 1), (1.0, 1), (2.0, 1), (3.0, 1), (1000.0, 9999))]
    med = AsyncBuffer(cfg(inner="median", k_updates=5, server_lr=2.0))
    trim = AsyncBuffer(cfg(inner="trimmed", k_updates=5, trim_fraction=0.2))
    for u in us:
        med.add(u, node_version=0, now=0.0)
        trim.add(u, node_version=0, now=0.0)
    r = med.flush(now=0.0)
    np.testing.assert_allclose(r.delta, [2.0 * 2.0])
    assert r.weights == pytest.approx([0.2] * 5)
    np.testing.assert_allclose(trim.flush(now=0.0).delta, [2.0])  # mean(1, 2, 3)


def test_buffer_clips_before_combining():
    buf = AsyncBuffer(cfg(clip_norm=1.0))
    buf.add(upd([300.0, 400.0], n=1), node_version=0, now=0.0)
    buf.add(upd([0.0, 0.5], n=1), node_version=0, now=0.0)
    np.testing.assert_allclose(buf.flush(now=0.0).delta, [(0.6 + 0.0) / 2, (0.8 + 0.5) / 2], rtol=RTOL)


@pytest.mark.parametrize("kwargs, field", [
    ({"k_updates": 0}, "k_updates"),
    ({"k_updates": 2.5}, "k_updates"),
    ({"max_wait_s": 0.0}, "max_wait_s"),
    ({"max_wait_s": float("nan")}, "max_wait_s"),
    ({"server_lr": 0.0}, "server_lr"),
    ({"server_lr": float("inf")}, "server_lr"),
    ({"staleness_exponent": -1.0}, "staleness_exponent"),
    ({"max_staleness": -1}, "max_staleness"),
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"inner": "mean"}, "inner"),
    ({"trim_fraction": 0.7}, "trim_fraction"),
    ({"inner": "trimmed", "k_updates": 3, "trim_fraction": 0.2}, "trims no"),
])
def test_buffer_config_names_the_bad_field(kwargs, field):
    with pytest.raises(AggregationError, match=field):
        BufferConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# make_strategy


@pytest.mark.parametrize("name, inner", [
    ("fedbuff", "fedavg"), ("fedavg", "fedavg"), ("fednova", "fednova"),
    ("median", "median"), ("trimmed", "trimmed"),
])
def test_make_strategy_names(name, inner):
    buf = make_strategy(name, expected_children=8)
    assert isinstance(buf, AsyncBuffer)
    assert buf.config.inner == inner


def test_make_strategy_defaults():
    sync = make_strategy("fedavg", expected_children=4).config
    assert sync.k_updates == 4 and sync.staleness_exponent == 0.0 and sync.max_wait_s >= 300
    buff = make_strategy("fedbuff").config
    assert buff.k_updates < 4 and buff.staleness_exponent == 0.5
    assert make_strategy("fedbuff", expected_children=2).config.k_updates == 2  # capped


def test_make_strategy_overrides_and_unknown_options():
    buf = make_strategy("fedbuff", k_updates=7, server_lr=0.5, clip_norm=3.0)
    assert (buf.config.k_updates, buf.config.server_lr, buf.config.clip_norm) == (7, 0.5, 3.0)
    with pytest.raises(AggregationError, match="k_update"):
        make_strategy("fedbuff", k_update=3)
    with pytest.raises(AggregationError, match="server_lr"):
        make_strategy("fedbuff", server_lr=-1.0)


def test_make_strategy_bad_name_lists_choices():
    with pytest.raises(AggregationError) as info:
        make_strategy("scaffold")
    for name in STRATEGIES:
        assert name in str(info.value)
    assert set(STRATEGIES) == {"fedbuff", "fedavg", "fednova", "median", "trimmed"}


def test_make_strategy_fedavg_needs_the_child_count():
    with pytest.raises(AggregationError, match="expected_children"):
        make_strategy("fedavg")
    assert make_strategy("fedavg", k_updates=3).config.k_updates == 3


@pytest.mark.parametrize("children, k, trimmed_each_end", [(3, 3, 1), (4, 4, 1), (5, 5, 1), (10, 5, 1)])
def test_make_strategy_trimmed_default_trims_one_from_each_end_under_few_children(children, k, trimmed_each_end):
    # An edge with 4 children caps K at 4, where the default 0.2 would trim nothing; it must still
    # aggregate (this crashed a node before) and still trim: the extremes of K hand-made updates go.
    buffer = make_strategy("trimmed", expected_children=children)
    assert buffer.config.k_updates == k
    values = [1000.0] + [float(i) for i in range(1, k - 1)] + [-1000.0]
    kept = sorted(values)[trimmed_each_end:k - trimmed_each_end]
    np.testing.assert_allclose(trimmed_mean([upd([v]) for v in values], buffer.config.trim_fraction),
                               [np.mean(kept)], rtol=RTOL)


def test_make_strategy_trimmed_refuses_what_trims_nothing():
    with pytest.raises(AggregationError, match="trims no"):
        make_strategy("trimmed", expected_children=2)  # two updates: nothing to trim and keep
    with pytest.raises(AggregationError, match="trims no"):
        make_strategy("trimmed", expected_children=4, trim_fraction=0.2)  # explicit: obeyed, so refused
    assert make_strategy("trimmed", expected_children=3, trim_fraction=0.34).config.k_updates == 3


# ---------------------------------------------------------------------------------------------
# Properties


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@given(delta=st.lists(finite32, min_size=1, max_size=32),
       samples=st.lists(st.integers(1, 10_000), min_size=1, max_size=8))
@settings(max_examples=80, deadline=None)
def test_fedavg_of_identical_deltas_is_that_delta(delta, samples):
    d = np.array(delta, dtype=np.float32)
    out = fedavg([upd(d, n=n) for n in samples])
    np.testing.assert_allclose(out, d, rtol=1e-6, atol=1e-30)


@given(seed=st.integers(0, 2**32 - 1), honest=st.integers(3, 7), size=st.integers(1, 16),
       magnitude=st.sampled_from([1e6, 1e20, 1e30]))
@settings(max_examples=60, deadline=None)
def test_median_and_trimmed_stay_within_honest_range_despite_one_outlier(seed, honest, size, magnitude):
    rng = np.random.default_rng(seed)
    good = [upd(rng.normal(size=size)) for _ in range(honest)]
    evil = upd(rng.choice([-1.0, 1.0], size=size) * magnitude, n=10**9)
    lo, hi = stack(good).min(axis=0), stack(good).max(axis=0)
    everyone = good[: honest // 2] + [evil] + good[honest // 2:]
    fraction = 1.0 / (honest + 1) + 1e-3  # trims exactly one update from each end
    for out in (coordinate_median(everyone), trimmed_mean(everyone, fraction)):
        assert np.all(out >= lo.astype(np.float32)) and np.all(out <= hi.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# apply_delta and merge_parent_model


def test_apply_delta():
    p = np.array([1.0, 2.0], np.float32)
    out = apply_delta(p, np.array([0.5, -2.0], np.float32))
    np.testing.assert_array_equal(out, [1.5, 0.0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(p, [1.0, 2.0])  # input untouched
    with pytest.raises(AggregationError, match="length"):
        apply_delta(p, np.ones(3, np.float32))


def test_merge_parent_model_hand_made():
    parent = np.array([10.0, 10.0], np.float32)
    local = np.array([3.0, 5.0], np.float32)
    pushed = np.array([1.0, 5.0], np.float32)
    np.testing.assert_allclose(merge_parent_model(parent, local, pushed), [12.0, 10.0])


@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 64))
@settings(max_examples=50, deadline=None)
def test_merge_parent_model_algebra(seed, size):
    rng = np.random.default_rng(seed)
    parent, local, pushed = (rng.normal(size=size).astype(np.float32) for _ in range(3))
    # nothing new locally -> take the parent model
    np.testing.assert_allclose(merge_parent_model(parent, pushed, pushed), parent, rtol=1e-6, atol=1e-6)
    # parent only echoes our push -> keep the local model
    np.testing.assert_allclose(merge_parent_model(pushed, local, pushed), local, rtol=1e-6, atol=1e-6)
    # in general: parent + local progress since the push
    expected = parent.astype(np.float64) + (local.astype(np.float64) - pushed.astype(np.float64))
    np.testing.assert_allclose(merge_parent_model(parent, local, pushed), expected, rtol=1e-5, atol=1e-6)


def test_merge_parent_model_refuses_mismatch_and_nan():
    ok = np.zeros(3, np.float32)
    with pytest.raises(AggregationError, match="length"):
        merge_parent_model(ok, ok, np.zeros(4, np.float32))
    with pytest.raises(AggregationError, match="non-finite"):
        merge_parent_model(ok, np.array([0, np.nan, 0], np.float32), ok)


def test_a_trimmed_buffer_flushed_early_still_trims_the_extremes():
    # K = 4 trims 1/4 from each end; a timer flush of 3 updates must not let the extreme through
    # (floor(0.25 x 3) = 0 would have averaged a poisoned 1000 in)
    np.testing.assert_allclose(trimmed_mean([upd([1000.0]), upd([1.0]), upd([2.0])], 0.25), [2.0])
    np.testing.assert_allclose(trimmed_mean([upd([1000.0]), upd([1.0])], 0.25), [500.5])  # 2: nothing to keep
    np.testing.assert_allclose(trimmed_mean([upd([1000.0]), upd([1.0]), upd([2.0])], 0.0), [1003.0 / 3])
