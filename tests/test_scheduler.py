"""Sync schedulers: the marginal-value rule against its analytic optimum, the hints, the
baselines, and inputs that must never produce NaN or an exception.

Expected values are computed here from the maths (a root-finder for the optimal interval, the
paper's formula for the adaptive tau), never by asking the code under test.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime.scheduler import (
    AdaptiveConfig,
    AdaptiveScheduler,
    Decision,
    FixedConfig,
    FixedScheduler,
    MarginalConfig,
    MarginalValueScheduler,
    SchedulerConfigError,
    StepObservation,
    SyncScheduler,
    make_scheduler,
)
from tomtit.errors import TomtitError

L0 = 3.0  # starting loss of every synthetic cycle
# The Charnov test alone, as the analytic checks below need it: without the first-cycle
# measurement and the cheap-sync shortcut (both tested on their own further down).
PURE = {"cheap_share": 0.0, "measure_first": False}

# (G, T, c, S): gain curve g(k) = G(1 - exp(-k/T)), c joules per step, S joules per sync.
# Chosen so k* spans short (< window) and long cycles and several S/(cT) ratios.
ROWS = [
    (1.0, 20.0, 1.0, 10.0),
    (2.0, 10.0, 0.5, 20.0),
    (0.5, 40.0, 2.0, 30.0),
    (1.0, 15.0, 1.0, 100.0),
    (1.0, 30.0, 3.0, 5.0),
    (1.0, 8.0, 1.0, 4.0),
    (1.0, 60.0, 1.0, 20.0),
    (0.2, 12.0, 0.3, 3.0),
]


def gain(G: float, T: float, k: float) -> float:
    return G * (1.0 - math.exp(-k / T))


def optimal_k(G: float, T: float, c: float, S: float) -> float:
    """k* maximising g(k)/(c k + S): the root of g'(k)(c k + S) - c g(k), by bisection.

    f > 0 near k = 0 (g'(0) S > 0) and f < 0 for large k (g' -> 0, g -> G), and f is
    decreasing for this concave g, so the root is unique.
    """

    def f(k: float) -> float:
        return (G / T) * math.exp(-k / T) * (c * k + S) - c * gain(G, T, k)

    lo, hi = 1e-9, 1e6
    assert f(lo) > 0 > f(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def average_rate(G: float, T: float, c: float, S: float, k: float) -> float:
    return gain(G, T, k) / (c * k + S)


def step(loss: float, joules: float = 1.0, seconds: float = 0.1, samples: int = 32
         ) -> StepObservation:
    return StepObservation(loss=loss, joules=joules, seconds=seconds, samples=samples)


def run_cycles(sched: SyncScheduler, G: float, T: float, c: float, S: float, cycles: int,
               sigma: float = 0.0, seed: int = 0, limit: int = 1000) -> list[int]:
    """Feed identical cycles (loss restarts at L0 after each sync); return the intervals."""
    rng = np.random.default_rng(seed)
    intervals = []
    for _ in range(cycles):
        for k in range(1, limit + 1):
            noise = sigma * rng.standard_normal() if sigma else 0.0
            if sched.observe(step(L0 - gain(G, T, k) + noise, joules=c)).sync:
                intervals.append(k)
                sched.on_synced(cost_joules=S)
                break
        else:
            pytest.fail(f"no sync within {limit} steps")
    return intervals


def steady_interval(G: float, T: float, c: float, S: float) -> int:
    intervals = run_cycles(MarginalValueScheduler(MarginalConfig(**PURE, sync_cost_j=S)), G, T, c, S,
                           cycles=4)
    assert len(set(intervals)) == 1, intervals  # noise-free with the true S: one interval
    return intervals[-1]


def all_floats_finite(d: Decision) -> None:
    assert d.action in ("continue", "sync", "pause")
    assert isinstance(d.reason, str) and d.reason
    for key, value in d.estimate.items():
        assert isinstance(value, float), (key, value)
        assert math.isfinite(value), (key, value, d.reason)


# ---------------------------------------------------------------------------------------------
# The marginal rule against the analytic optimum


@pytest.mark.parametrize("G,T,c,S", ROWS)
def test_marginal_syncs_at_analytic_optimum_without_noise(G, T, c, S):
    k_star = optimal_k(G, T, c, S)
    sched = MarginalValueScheduler(MarginalConfig(**PURE, sync_cost_j=S))
    intervals = run_cycles(sched, G, T, c, S, cycles=6)
    # every cycle, the first too: its bootstrap (own average incl. S) is the optimum's condition
    for k in intervals:
        assert abs(k - round(k_star)) <= 1, (k_star, intervals)
    # R is learned from fitted (not raw) start and end losses; a quadratic through the first ten
    # steps of a steep exponential (T=8) extrapolates the start loss ~2% short
    assert sched.average_rate == pytest.approx(average_rate(G, T, c, S, intervals[-1]), rel=3e-2)


@pytest.mark.parametrize("G,T,c,S", ROWS[:7])
def test_marginal_with_small_noise_stays_near_optimum(G, T, c, S):
    """Noise of half a step's loss drop at k*, one fixed seed.

    Tolerance: near k* the average rate g(k)/(ck+S) is flat (second order), so the quantity
    that matters is the rate achieved, not the exact step; we ask >= 93% of the optimum (over
    20 seeds the worst row reached 94%). The rule is meant to err late, never early (upper
    confidence bound; a straight-line fit on gentle bends reads the slope (W-1)/2 steps back),
    so the median interval must be >= 0.9 k*, and <= 2.2 k* (worst seen 2.0, on k* = 9.5 where
    the lag alone is half of k*).
    """
    k_star = optimal_k(G, T, c, S)
    sigma = 0.5 * (G / T) * math.exp(-k_star / T)
    sched = MarginalValueScheduler(MarginalConfig(**PURE, sync_cost_j=S))
    intervals = run_cycles(sched, G, T, c, S, cycles=12, sigma=sigma, seed=7)[2:]
    best = average_rate(G, T, c, S, k_star)
    achieved = np.mean([average_rate(G, T, c, S, k) for k in intervals])
    assert achieved >= 0.93 * best, (k_star, intervals)
    assert 0.9 * k_star <= np.median(intervals) <= 2.2 * k_star, (k_star, intervals)


def test_higher_sync_cost_gives_longer_interval():
    ks = [steady_interval(1.0, 20.0, 1.0, S) for S in (2.0, 10.0, 40.0, 160.0)]
    assert ks == sorted(ks) and len(set(ks)) == len(ks), ks


def test_steeper_curve_gives_shorter_interval():
    ks = [steady_interval(1.0, T, 1.0, 10.0) for T in (60.0, 30.0, 15.0, 8.0)]
    assert ks == sorted(ks, reverse=True) and len(set(ks)) == len(ks), ks


def test_wrong_prior_sync_cost_is_outgrown():
    """Configured S = 1 J, real syncs cost 40 J: measured costs and R take over."""
    G, T, c, S = 1.0, 20.0, 1.0, 40.0
    k_star = optimal_k(G, T, c, S)
    intervals = run_cycles(MarginalValueScheduler(MarginalConfig(**PURE, sync_cost_j=1.0)), G, T, c, S,
                           cycles=30)
    assert intervals[0] < k_star - 5  # the first cycle believed syncs were cheap
    assert all(abs(k - round(k_star)) <= 1 for k in intervals[-5:]), (k_star, intervals)


def test_marginal_sync_reason_is_readable():
    sched = MarginalValueScheduler(MarginalConfig(**PURE, sync_cost_j=10.0))
    run_cycles(sched, 1.0, 20.0, 1.0, 10.0, cycles=2)
    d = None
    for k in range(1, 100):
        d = sched.observe(step(L0 - gain(1.0, 20.0, k)))
        if d.sync:
            break
    assert d is not None and d.sync
    assert re.fullmatch(r"marginal [0-9.e-]+/J <= avg [0-9.e-]+/J at k=\d+", d.reason), d.reason
    for key in ("marginal_rate", "marginal_se", "average_rate", "predicted_k", "sync_cost_j"):
        assert key in d.estimate


def test_sync_cost_is_learned_by_ema_of_measured_costs():
    sched = MarginalValueScheduler(MarginalConfig(**PURE, sync_cost_j=5.0, cost_weight=0.5))
    sched.on_synced(cost_joules=None)  # nothing measured yet: the prior stands
    assert sched.sync_cost_j == 5.0
    expected = None
    for cost in (9.0, 1.0, 4.0):
        for k in range(1, 6):
            sched.observe(step(L0 - 0.01 * k))
        sched.on_synced(cost_joules=cost)
        # the first measurement replaces the 5 J prior; later ones are averaged in
        expected = cost if expected is None else 0.5 * expected + 0.5 * cost
        assert sched.sync_cost_j == pytest.approx(expected)
    assert expected == pytest.approx(0.5 * (0.5 * 9.0 + 0.5 * 1.0) + 0.5 * 4.0)
    sched.on_synced(cost_joules=None)  # not measured: estimate unchanged
    assert sched.sync_cost_j == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Hints: staleness, battery, deadline; clamps


def warmed_marginal(**cfg) -> tuple[MarginalValueScheduler, int]:
    """A scheduler settled on the (1, 20, 1, 10) curve, and its undisturbed interval."""
    config = MarginalConfig(**{**PURE, "sync_cost_j": 10.0, **cfg})
    sched = MarginalValueScheduler(config)
    intervals = run_cycles(sched, 1.0, 20.0, 1.0, 10.0, cycles=3)
    return sched, intervals[-1]


Hint = Callable[[SyncScheduler], None]


def interval_with(sched: SyncScheduler, before_step: dict[int, Hint], limit: int = 500
                  ) -> tuple[int, Decision]:
    """Run one cycle of the (1, 20, 1, 10) curve, giving hints before the listed steps."""
    for k in range(1, limit + 1):
        if k in before_step:
            before_step[k](sched)
        d = sched.observe(step(L0 - gain(1.0, 20.0, k)))
        if d.sync:
            return k, d
    pytest.fail("no sync")


def test_staleness_beyond_v_syncs_sooner():
    sched, k0 = warmed_marginal(max_staleness=3)
    k, d = interval_with(sched, {7: lambda s: s.on_parent_model(12, parent_version_lag=4)})
    assert k == 7 < k0 and "versions ahead" in d.reason


def test_a_merge_jump_is_not_counted_as_gain_or_loss():
    """A parent model merged mid-cycle moves the loss (others' progress, non-IID drift); the
    rule must measure its own training, so the jump is taken out and the interval matches an
    undisturbed cycle's within a step, whether the jump is up or down."""
    for jump in (+0.8, -0.8):
        sched, k0 = warmed_marginal()
        for k in range(1, 500):
            if k == 8:
                sched.on_parent_model(99)
            shift = jump if k >= 8 else 0.0
            d = sched.observe(step(L0 - gain(1.0, 20.0, k) + shift))
            if d.sync:
                break
        assert abs(k - k0) <= 1, (jump, k, k0)
        assert sched.merge_jumps[-1] == pytest.approx(jump, abs=0.05)


def test_staleness_lasts_one_cycle_only():
    """The issue-9 repro: one late parent model (lag 10) used to pin the rule at tau_min forever
    (300 syncs in 600 steps instead of ~52). After the one forced sync, intervals are normal."""
    def syncs(hint: bool) -> list[int]:
        rng = np.random.default_rng(0)
        sched = make_scheduler("marginal:tau_min=2,tau_max=50")
        if hint:
            sched.on_parent_model(1, parent_version_lag=10)
        out, k, level = [], 0, L0
        for _ in range(600):
            k += 1
            level = 0.05 + (level - 0.05) * 0.97
            d = sched.observe(step(level + 0.01 * rng.standard_normal()))
            if d.sync:
                out.append(k)
                k, level = 0, level + 0.3  # a new cycle restarts from a worse merged model
                sched.on_synced(cost_joules=10.0)
        return out

    undisturbed, hinted = syncs(False), syncs(True)
    assert hinted[0] == 2  # forced: the parent is 10 > V versions ahead
    assert len(hinted) < 100, hinted  # before the fix: 300
    assert abs(len(hinted) - len(undisturbed)) <= 2
    assert sorted(hinted[1:])[len(hinted) // 2] > 2  # the median interval is not tau_min


def test_staleness_within_v_changes_nothing():
    # Compared with the same parent model arriving with lag 0 (a merge mid-cycle is itself
    # noticed: its loss jump is taken out of the series), a lag within V changes nothing.
    sched, _ = warmed_marginal(max_staleness=3)
    k0, _ = interval_with(sched, {7: lambda s: s.on_parent_model(12, parent_version_lag=0)})
    sched, _ = warmed_marginal(max_staleness=3)
    k, _ = interval_with(sched, {7: lambda s: s.on_parent_model(12, parent_version_lag=3)})
    assert k == k0


@pytest.mark.parametrize("battery,expect_flush", [(0.1, True), (0.0, True), (0.25, False),
                                                   (0.9, False), (None, False)])
def test_low_battery_syncs_sooner(battery, expect_flush):
    sched, k0 = warmed_marginal(battery_low=0.2, tau_min=5)
    k, d = interval_with(sched, {1: lambda s: s.set_battery_reserve(battery)})
    if expect_flush:
        assert k == 5 < k0 and "battery" in d.reason
    else:
        assert k == k0


def test_deadline_forces_sync_even_before_tau_min():
    sched, k0 = warmed_marginal(tau_min=5)
    k, d = interval_with(sched, {2: lambda s: s.set_deadline(6)})
    assert k == 7 < k0 and "deadline" in d.reason  # set before step 2: steps 2..7 are its six
    sched.on_synced(10.0)
    k, _ = interval_with(sched, {1: lambda s: s.set_deadline(1)})
    assert k == 1  # the parent aggregates after one more step: go now, tau_min or not
    sched.on_synced(10.0)
    k, d = interval_with(sched, {})  # a sync clears the deadline
    # not forced; and later than k0, as it should be: the two short forced cycles earned less,
    # so the long-run average fell and the rule now stays longer (the habitat got poorer)
    assert k >= k0 and d.reason.startswith("marginal")


def test_deadline_later_than_the_rule_changes_nothing():
    sched, k0 = warmed_marginal()
    k, _ = interval_with(sched, {1: lambda s: s.set_deadline(k0 + 20)})
    assert k == k0


@pytest.mark.parametrize("curve,tau_min,tau_max,expected", [
    ("flat", 7, 50, 7),  # nothing to gain: the rule would go at once, tau_min holds it
    ("rising", 6, 50, 6),
    ("steady", 5, 30, 30),  # a straight decline never falls below its own average: tau_max
    ("steady", 5, 12, 12),
])
def test_tau_clamps(curve, tau_min, tau_max, expected):
    loss = {"flat": lambda k: 2.0, "rising": lambda k: 2.0 + 0.01 * k,
            "steady": lambda k: 2.0 - 0.01 * k}[curve]
    sched = MarginalValueScheduler(MarginalConfig(**PURE, tau_min=tau_min, tau_max=tau_max))
    for _ in range(3):
        for k in range(1, 1000):
            d = sched.observe(step(loss(k)))
            if d.sync:
                break
        assert k == expected, d.reason
        sched.on_synced(5.0)


def test_pause_only_when_allowed_synced_and_nothing_is_gained():
    for allow in (False, True):
        sched = MarginalValueScheduler(MarginalConfig(**PURE, allow_pause=allow, tau_min=5))
        interval_with(sched, {})  # a first cycle, synced
        sched.on_synced(5.0)
        # after our sync the local loss only rises: training burns energy for nothing
        actions = [sched.observe(step(1.0 + 0.01 * i)).action for i in range(1, 7)]
        if allow:
            assert actions[:4] == ["continue"] * 4 and actions[4] == "pause"
            sched.on_parent_model(3)  # the parent answered: no more waiting (rising: sync)
            assert sched.observe(step(1.07)).action == "sync"
        else:
            assert "pause" not in actions and actions[4] == "sync"


# ---------------------------------------------------------------------------------------------
# Never NaN, never an exception


def _degenerate_streams() -> dict[str, list[tuple[float, float, float, float]]]:
    n = 260
    k = np.arange(1, n + 1)
    rng = np.random.default_rng(3)
    return {
        "flat": [(1.0, 1.0, 0.1, 32)] * n,
        "rising": [(1.0 + 0.1 * i, 1.0, 0.1, 32) for i in k],
        "zero loss": [(0.0, 1.0, 0.1, 32)] * n,
        "zero joules": [(2.0 - 0.01 * i, 0.0, 0.0, 32) for i in k],
        "negative joules": [(2.0 - 0.01 * i, -5.0, -1.0, 32) for i in k],
        "tiny joules": [(2.0 - 0.01 * i, 1e-300, 1e-300, 32) for i in k],
        "huge joules": [(2.0 - 0.01 * i, 1e300, 1e300, 32) for i in k],
        "huge loss": [(1e300 / i, 1.0, 0.1, 32) for i in k],
        "huge alternating": [((-1) ** i * 1e200, 1.0, 0.1, 32) for i in k],
        "nan loss": [(math.nan, 1.0, 0.1, 32)] * n,
        "inf everywhere": [(math.inf, math.inf, math.inf, 32)] * n,
        "some nan": [((math.nan if i % 3 else 2.0 - 0.001 * i), 1.0, 0.1, 32) for i in k],
        "zero samples": [(2.0 - 0.01 * i, 1.0, 0.1, 0) for i in k],
        "noise only": [(1.0 + rng.standard_normal(), 1.0, 0.1, 32) for i in k],
        "cliff": [((5.0 if i < 50 else 0.1), 1.0, 0.1, 32) for i in k],
    }


SCHEDULERS = {
    "marginal": lambda: MarginalValueScheduler(MarginalConfig(**PURE, allow_pause=True)),
    "marginal-z0": lambda: MarginalValueScheduler(MarginalConfig(**PURE, z=0.0, tau_min=1)),
    "fixed": lambda: FixedScheduler(7),
    "adaptive": lambda: AdaptiveScheduler(AdaptiveConfig(tau_init=4, tau_max=30)),
}
SYNC_COSTS = [10.0, 0.0, math.nan, -3.0, math.inf, 1e300, None]


@pytest.mark.parametrize("stream", list(_degenerate_streams()))
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_degenerate_inputs_give_finite_decisions(kind, stream):
    sched = SCHEDULERS[kind]()
    sched.set_battery_reserve(math.nan)  # a glitching gauge is ignored
    sched.set_deadline(None)
    syncs = 0
    for i, (loss, joules, seconds, samples) in enumerate(_degenerate_streams()[stream]):
        d = sched.observe(StepObservation(loss, joules, seconds, samples))
        all_floats_finite(d)
        if d.sync:
            cost = SYNC_COSTS[syncs % len(SYNC_COSTS)]
            sched.on_synced(cost_joules=cost, cost_seconds=cost)
            syncs += 1
        if d.action == "pause":
            sched.on_parent_model(i)
    assert syncs >= 1  # tau_max (or tau) always ends a cycle
    assert isinstance(sched.describe(), str)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(min_value=-5, max_value=10**12),
        ),
        min_size=1, max_size=60,
    ),
    cost=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    battery=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    lag=st.integers(min_value=-3, max_value=10),
)
def test_any_inputs_give_finite_decisions(steps, cost, battery, lag):
    for make in (lambda: MarginalValueScheduler(MarginalConfig(**PURE, tau_min=2, tau_max=15,
                                                               allow_pause=True)),
                 lambda: AdaptiveScheduler(AdaptiveConfig(tau_init=3, tau_max=10))):
        sched = make()
        sched.set_battery_reserve(battery)
        sched.on_parent_model(1, parent_version_lag=lag)
        for loss, joules, seconds, samples in steps:
            d = sched.observe(StepObservation(loss, joules, seconds, samples))
            all_floats_finite(d)
            if d.sync:
                sched.on_synced(cost_joules=cost, cost_seconds=cost)


# ---------------------------------------------------------------------------------------------
# Baselines


@pytest.mark.parametrize("tau", [1, 3, 10])
def test_fixed_syncs_every_tau_steps_whatever_the_hints(tau):
    sched = FixedScheduler(FixedConfig(tau=tau))
    sched.on_parent_model(9, parent_version_lag=50)  # ignored on purpose: it is the baseline
    sched.set_battery_reserve(0.01)
    syncs_at = []
    for i in range(1, 5 * tau + 1):
        d = sched.observe(step(1.0 / i))
        if d.sync:
            assert d.reason == f"fixed tau={tau}" and d.steps_since_sync == tau
            syncs_at.append(i)
            sched.on_synced(1.0)
    assert syncs_at == [tau * m for m in range(1, 6)]


def paper_tau(est: dict[str, float], cfg: AdaptiveConfig) -> int:
    """argmin over tau of Wang et al.'s bound, written out from the paper's formulas.

    h(tau) = delta/beta ((eta beta + 1)^tau - 1) - eta delta tau,
    T(tau) = R tau / (c tau + b),
    gap = (1 + sqrt(1 + 4 T^2 phi eta rho h / tau)) / (2 T eta phi) + rho h.
    Only rho*delta is estimated (rho and delta enter the bound only as that product).
    """
    eta, phi, R = cfg.lr, cfg.phi, cfg.budget_j
    beta = est["eta_beta"] / eta
    rho_delta = est["rho_delta"]
    c, b = est["step_cost_j"], est["sync_cost_j"]
    best = None
    for tau in range(1, cfg.tau_max + 1):
        rho_h = rho_delta / beta * ((eta * beta + 1) ** tau - 1) - eta * rho_delta * tau
        rho_h = max(rho_h, 0.0)
        T = R * tau / (c * tau + b)
        gap = (1 + math.sqrt(1 + 4 * T**2 * phi * eta * rho_h / tau)) / (2 * T * eta * phi) + rho_h
        if best is None or gap < best[0] - 1e-12 * abs(best[0]):
            best = (gap, tau)
    return best[1]


def run_adaptive(b: float, c: float = 1.0, cycles: int = 10, cfg: AdaptiveConfig | None = None
                 ) -> tuple[list[int], AdaptiveScheduler, Decision]:
    """Cycles whose start loss jumps by 0.01 per local step of the previous cycle (drift)."""
    cfg = cfg or AdaptiveConfig(tau_init=10, tau_max=60)
    sched = AdaptiveScheduler(cfg)
    start, taus = L0, []
    for cycle in range(cycles):
        for k in range(1, 10_000):
            loss = start - gain(1.0, 20.0, k) * 0.9**cycle
            d = sched.observe(step(loss, joules=c))
            if d.sync:
                break
        sched.on_synced(cost_joules=b)
        taus.append(sched.tau)
        start = loss + 0.01 * k
    last = sched.observe(step(start, joules=c))
    return taus, sched, last


def test_adaptive_keeps_tau_init_until_drift_is_seen():
    taus, _, _ = run_adaptive(b=5.0, cycles=1)
    assert taus == [10]


def test_adaptive_tau_grows_with_sync_cost_and_stays_in_bounds():
    finals = []
    for b in (1.0, 30.0, 300.0, 3000.0):
        taus, _, _ = run_adaptive(b=b)
        assert all(1 <= t <= 60 for t in taus)
        finals.append(taus[-1])
    assert finals == sorted(finals) and finals[-1] > finals[0], finals


def test_adaptive_tau_is_the_papers_argmin_for_its_estimates():
    cfg = AdaptiveConfig(tau_init=10, tau_max=60)
    for b in (3.0, 300.0, 3000.0):
        _, sched, last = run_adaptive(b=b, cfg=cfg)
        assert sched.tau == paper_tau(last.estimate, cfg)
        assert last.estimate["tau"] == sched.tau


def test_adaptive_honours_tau_max():
    cfg = AdaptiveConfig(tau_init=5, tau_max=8)
    taus, _, _ = run_adaptive(b=1e6, cfg=cfg)
    assert max(taus) <= 8 and taus[-1] == 8


# ---------------------------------------------------------------------------------------------
# make_scheduler


@pytest.mark.parametrize("spec,kwargs,cls,expected", [
    ("marginal", {}, MarginalValueScheduler, MarginalConfig()),
    (" Marginal ", {}, MarginalValueScheduler, MarginalConfig()),
    ("marginal:tau_min=2,tau_max=50", {}, MarginalValueScheduler,
     MarginalConfig(tau_min=2, tau_max=50)),
    ("marginal:z=0.5, allow_pause=yes", {"sync_cost_j": 3}, MarginalValueScheduler,
     MarginalConfig(z=0.5, allow_pause=True, sync_cost_j=3.0)),
    ("marginal:sync_cost_j=7", {"sync_cost_j": 3.0}, MarginalValueScheduler,
     MarginalConfig(sync_cost_j=7.0)),  # the spec is the more specific choice
    ("fixed:10", {}, FixedScheduler, FixedConfig(tau=10)),
    ("fixed:tau=4", {}, FixedScheduler, FixedConfig(tau=4)),
    ("fixed", {"tau": 6}, FixedScheduler, FixedConfig(tau=6)),
    ("adaptive", {}, AdaptiveScheduler, AdaptiveConfig()),
    ("adaptive:tau_max=40,budget_j=1e5", {}, AdaptiveScheduler,
     AdaptiveConfig(tau_max=40, budget_j=1e5)),
])
def test_make_scheduler_parses(spec, kwargs, cls, expected):
    sched = make_scheduler(spec, **kwargs)
    assert type(sched) is cls and sched.config == expected
    assert sched.name == cls.name and isinstance(sched.describe(), str)


@pytest.mark.parametrize("spec,kwargs,names", [
    ("", {}, "empty"),
    ("foo", {}, "'foo'"),
    ("foo:3", {}, "'foo'"),
    ("marginal:bogus=1", {}, "'bogus'"),
    ("marginal", {"bogus": 1}, "'bogus'"),
    ("fixed", {"sync_cost_j": 1.0}, "'sync_cost_j'"),
    ("marginal:tau_min=x", {}, "tau_min"),
    ("marginal:5", {}, "'5'"),
    ("marginal:tau_min=10,tau_max=5", {}, "tau_max"),
    ("marginal:z=nan", {}, "z="),
    ("marginal:z=-1", {}, "z="),
    ("marginal:window=2", {}, "window"),
    ("marginal:allow_pause=maybe", {}, "allow_pause"),
    ("marginal:tau_max=2.5", {}, "tau_max"),
    ("fixed:0", {}, "tau"),
    ("fixed:ten", {}, "tau"),
    ("adaptive:tau_init=0", {}, "tau_init"),
    ("adaptive:lr=0", {}, "lr"),
])
def test_make_scheduler_rejects_with_the_bad_part_named(spec, kwargs, names):
    with pytest.raises(SchedulerConfigError, match=re.escape(names)) as info:
        make_scheduler(spec, **kwargs)
    assert isinstance(info.value, TomtitError)


def test_scheduler_interface_is_abstract():
    with pytest.raises(TypeError):
        SyncScheduler()  # type: ignore[abstract]


def test_the_first_cycle_ends_at_tau_min_to_measure_the_sync_cost():
    sched2 = MarginalValueScheduler(MarginalConfig(tau_min=4, sync_cost_j=1e6))
    d = None
    for k in range(1, 5):
        d = sched2.observe(step(L0 - gain(1.0, 20.0, k)))
    assert d.sync and "measure" in d.reason


@pytest.mark.parametrize("S,c,share,expect_k", [
    (0.05, 1.0, 0.1, 5),  # a Wi-Fi-cheap sync (0.05 J vs 1 J steps): at tau_min
    (3.0, 1.0, 0.1, 30),  # S <= 0.1 x e_k first holds at e_k = 30 J
    (3.0, 0.5, 0.1, 60),
])
def test_a_cheap_sync_is_sent_once_it_costs_at_most_a_share_of_the_training_it_ships(S, c, share, expect_k):
    # A straight decline: its marginal rate never falls to the cycle's average (which S keeps
    # below it), so only the cheap-sync rule can end the cycle.
    sched = MarginalValueScheduler(MarginalConfig(tau_min=5, tau_max=500, sync_cost_j=S, cheap_share=share,
                                                  measure_first=False, cost_weight=1.0))
    for k in range(1, 500):
        d = sched.observe(step(3.0 - 0.01 * k * c, joules=c))
        if d.sync:
            break
    assert k == max(5, math.ceil(S / (share * c) - 1e-9)) == expect_k, (k, d.reason)
    assert "cheap sync" in d.reason or k == 5


def test_an_expensive_sync_leaves_the_decision_to_the_marginal_rule():
    sched = MarginalValueScheduler(MarginalConfig(sync_cost_j=10.0, measure_first=False))
    k0 = next(k for k in range(1, 500) if sched.observe(step(L0 - gain(1.0, 20.0, k))).sync)
    pure = MarginalValueScheduler(MarginalConfig(sync_cost_j=10.0, **PURE))
    k1 = next(k for k in range(1, 500) if pure.observe(step(L0 - gain(1.0, 20.0, k))).sync)
    assert k0 == k1  # 0.1 x e_k < S until long after the rule's own optimum


def test_adaptive_takes_its_first_measured_sync_cost_over_the_prior():
    _, sched, last = run_adaptive(b=0.06, cycles=1, cfg=AdaptiveConfig(tau_init=10, tau_max=60, weight=0.3))
    # one measured 0.06 J sync: b is that measurement, not 0.7 x 5 J prior + 0.3 x 0.06 J
    assert last.estimate["sync_cost_j"] == pytest.approx(0.06)
    _, sched, last = run_adaptive(b=0.06, cycles=3, cfg=AdaptiveConfig(tau_init=10, tau_max=60, weight=0.3))
    assert last.estimate["sync_cost_j"] == pytest.approx(0.06)  # averaging equal costs keeps them
