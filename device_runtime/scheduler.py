"""Sync schedulers: each node decides on its own when to send its model to its parent.

A scheduler is pure: it is told about finished steps (`observe`) and finished syncs
(`on_synced`), and hints from outside (a new parent model, the battery, a parent's deadline);
it answers with a `Decision`. No clock, no broker, no file inside, so the device agent, the edge
node and the simulator run the very same object. For an edge node a "step" is one absorbed child
update and its loss the sample-weighted child loss (DESIGN §5).

Three schedulers share one interface, so runs can compare them:
- `MarginalValueScheduler` (ours): Charnov's marginal value theorem, energy-based (DESIGN §5).
- `FixedScheduler`: every tau steps (FedAvg's E, HierFAVG's kappa).
- `AdaptiveScheduler`: the adaptive tau of Wang et al., IEEE JSAC 2019, from losses only.

`make_scheduler("marginal:tau_min=2,tau_max=50")` builds one from a spec string.

Standard library and numpy only: this runs on the board, which never has torch.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Literal

import numpy as np

from tomtit.errors import TomtitError

Action = Literal["continue", "sync", "pause"]

# Inputs are clipped to these magnitudes so every sum of squares stays far inside float64
# (1e12**2 * window * 1e3 is still < 1e30): a diverged loss of 1e300 must not become inf/NaN.
_LOSS_LIMIT = 1e12
_JOULE_LIMIT = 1e12
_SECOND_LIMIT = 1e9
_SAMPLE_LIMIT = 1e9


# The schedulers ours runs with, everywhere (the CLI's defaults and the simulator's "ours").
# A device keeps tau_min = 5 steps: fewer noisy minibatch losses make a slope that ends cycles at
# random. An edge's "step" is one absorbed child update and its loss the sample-weighted mean of
# its children's latest losses, far less noisy than one minibatch, so tau_min = 1: with the device
# default an edge under 4 children syncing together waited for two bursts of updates before its
# first push and pushed ~25 % less often than a tuned kappa = 4 (docs/evaluation.md, section 3).
DEVICE_SCHEDULER = "marginal"
EDGE_SCHEDULER = "marginal:tau_min=1"


class SchedulerConfigError(TomtitError, ValueError):
    """A scheduler spec or config value is wrong; the message names the bad part."""


@dataclass(frozen=True)
class StepObservation:
    """One finished local step, as measured.

    loss: the step's training loss (for an edge: the sample-weighted loss of the absorbed update).
    joules: energy of this step alone (not cumulative); seconds: its wall time;
    samples: examples it used (weights the loss in fits: a bigger batch is a less noisy loss).
    Not validated here: values come from meters and trainers and the scheduler sanitises them,
    because a glitching meter must never stop training.
    """

    loss: float
    joules: float
    seconds: float
    samples: int


@dataclass(frozen=True)
class Decision:
    """What to do after a step, why (for telemetry and humans), and the numbers behind it."""

    action: Action
    reason: str
    steps_since_sync: int
    estimate: dict[str, float]

    @property
    def sync(self) -> bool:
        return self.action == "sync"


# ---------------------------------------------------------------------------------------------
# Small numeric helpers


def _fmt(x: float) -> str:
    """Short human number: 0.0123, 12.3, 3.1e-4 (no zero-padded exponents)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.3g}"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _finite(x: float, default: float = 0.0) -> float:
    return float(x) if math.isfinite(x) else default


def _ema(old: float | None, new: float, weight: float) -> float:
    """Exponential moving average; the first sample is taken as is (no zero-start bias)."""
    return new if old is None else (1.0 - weight) * old + weight * new


def _measured(x: Any, limit: float) -> float | None:
    """A reported cost, or None when it was not measured or is not a usable number."""
    v = _as_float(x)
    return min(v, limit) if math.isfinite(v) and v >= 0.0 else None


def _clean_estimate(values: dict[str, float | None]) -> dict[str, float]:
    """Telemetry numbers: drop unknowns, never emit NaN or inf (JSON and dashboards choke)."""
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


@dataclass(frozen=True)
class _Fit:
    """A local polynomial fit of loss against cumulative joules, read at one point `at`."""

    value: float  # fitted loss at `at`
    slope: float  # d loss / d joule at `at`
    slope_se: float  # standard error of `slope`
    curvature: float  # d2 loss / d joule2 (0 for a straight-line fit)
    degree: int
    n: int
    resid_var: float  # residual variance per unit weight (of the quadratic when one was fitted)


def _wls(u: np.ndarray, y: np.ndarray, w: np.ndarray, degree: int
         ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Weighted least squares by the normal equations: (coef, inverse of X'WX, residual var)."""
    design = np.vander(u, degree + 1, increasing=True)
    weighted = design * w[:, None]
    normal = design.T @ weighted
    try:
        inv = np.linalg.inv(normal)
    except np.linalg.LinAlgError:
        return None
    # |A|*|A^-1| bounds the condition number: above 1e12 the points are too bunched to pin
    # this many coefficients and the answer would be rounding noise
    if not np.all(np.isfinite(inv)) or np.abs(normal).max() * np.abs(inv).max() > 1e12:
        return None
    coef = inv @ (weighted.T @ y)
    resid = y - design @ coef
    dof = len(u) - (degree + 1)
    return coef, inv, float(resid @ (w * resid)) / dof


def _local_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, at: float, curve_t: float,
               noise_var: float = 0.0, quad_min_n: int = 8) -> _Fit | None:
    """Weighted least squares of y on x, read (value, slope) at x = `at`.

    A straight line's slope over a window is the slope at the window's centre, (W-1)/2 steps in
    the past: on a bending loss curve that lag makes a scheduler sync several steps late. So a
    quadratic is fitted too and used when its curvature is real (|t| > curve_t with >= 5
    residual degrees of freedom); its slope read at the window's end has no lag but a few
    times the variance. Where the bend is not significant (noisy or straight stretches) the
    line is kept: low variance, late-biased, and late is the cheaper side (see the scheduler).
    noise_var: a floor for the residual variance, pooled over earlier windows, so a window that
    happens to look quiet cannot claim a tiny standard error (it gets many chances per cycle).
    Returns None when the points cannot carry a slope with an error bar (n < 3 or no spread).
    """
    n = len(x)
    if n < 3:
        return None
    u = x - at
    scale = float(np.max(np.abs(u)))
    if not scale > 0.0:
        return None
    u = u / scale  # in [-1, 1]: keeps the normal equations well conditioned at any joule scale
    w = w / np.mean(w)

    quad = _wls(u, y, w, 2) if n >= 4 else None
    resid_var: float | None = quad[2] if quad is not None else None
    chosen: tuple[np.ndarray, np.ndarray, float, int] | None = None
    if quad is not None and n >= quad_min_n:
        coef, inv, s2 = quad
        se_curve = math.sqrt(max(s2, noise_var) * max(float(inv[2, 2]), 0.0))
        if abs(coef[2]) > curve_t * se_curve:
            chosen = (coef, inv, s2, 2)
    if chosen is None:
        line = _wls(u, y, w, 1)
        if line is None:
            return None
        chosen = (line[0], line[1], line[2], 1)
        if resid_var is None:
            resid_var = line[2]
    coef, inv, s2, degree = chosen
    fit = _Fit(
        value=float(coef[0]),
        slope=float(coef[1]) / scale,
        slope_se=math.sqrt(max(s2, noise_var) * max(float(inv[1, 1]), 0.0)) / scale,
        curvature=(2.0 * float(coef[2]) / scale**2) if degree == 2 else 0.0,
        degree=degree,
        n=n,
        resid_var=max(float(resid_var), 0.0),
    )
    if not all(math.isfinite(v) for v in (fit.value, fit.slope, fit.slope_se, fit.curvature,
                                           fit.resid_var)):
        return None
    return fit


class _Cycle:
    """The points of the current cycle that fits need, in bounded memory.

    Keeps the first `window` usable points (they fix the cycle's starting loss) and the last
    `window` (they give the marginal rate and the current loss); a cycle that never ends because
    nobody calls on_synced still costs O(window).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.steps = 0
        self.joules = 0.0
        self.seconds = 0.0
        self.head: list[tuple[float, float, float]] = []
        self.tail: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._start: _Fit | None = None

    def add(self, joules: float, seconds: float, loss: float | None, weight: float) -> None:
        self.steps += 1
        self.joules += joules
        self.seconds += seconds
        if loss is None:
            return
        point = (self.joules, loss, weight)
        if len(self.head) < self.window:
            self.head.append(point)
        self.tail.append(point)

    @staticmethod
    def _arrays(points: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arr = np.asarray(list(points), dtype=np.float64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def start_fit(self, curve_t: float, noise_var: float = 0.0, quad_min_n: int = 8
                  ) -> _Fit | None:
        """The loss at the cycle's start (0 J), extrapolated from its first points.

        Settled once the first window is in: later points say nothing more about the start.
        """
        if self._start is not None:
            return self._start
        x, y, w = self._arrays(self.head)
        fit = _local_fit(x, y, w, 0.0, curve_t, noise_var, quad_min_n)
        if len(self.head) == self.window:
            self._start = fit
        return fit

    def end_fit(self, curve_t: float, noise_var: float = 0.0, quad_min_n: int = 8
                ) -> _Fit | None:
        """Loss and slope at the latest point, from the last `window` points."""
        if not self.tail:
            return None
        x, y, w = self._arrays(self.tail)
        return _local_fit(x, y, w, float(x[-1]), curve_t, noise_var, quad_min_n)


def _as_float(x: Any) -> float:
    """float(x), or NaN for anything that is not a number (None, strings, numpy oddities)."""
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _sanitize(step: StepObservation, min_joules: float, fallback_joules: float | None
              ) -> tuple[float, float, float | None, float]:
    """(joules, seconds, loss or None, weight), every value finite and within limits."""
    j = _as_float(step.joules)
    if not math.isfinite(j):
        j = fallback_joules if fallback_joules is not None else min_joules
    j = min(max(j, min_joules), _JOULE_LIMIT)  # zero-joule steps would stack points on one x
    s = _as_float(step.seconds)
    s = min(max(s, 0.0), _SECOND_LIMIT) if math.isfinite(s) else 0.0
    raw = _as_float(step.loss)
    # a NaN loss says nothing about the curve; its joules still count
    loss = min(max(raw, -_LOSS_LIMIT), _LOSS_LIMIT) if math.isfinite(raw) else None
    n = _as_float(step.samples)
    weight = min(max(n, 1.0), _SAMPLE_LIMIT) if math.isfinite(n) else 1.0
    return j, s, loss, weight


# ---------------------------------------------------------------------------------------------
# The interface


class SyncScheduler(ABC):
    """Decides, step by step, whether this node should sync with its parent.

    The hints (`on_parent_model`, `set_battery_reserve`, `set_deadline`) are stored here for
    every scheduler; only the marginal-value scheduler acts on them. The fixed and adaptive
    baselines ignore them on purpose: they are the published rules the marginal rule is
    measured against, and neither paper has such signals.
    """

    name: str = "scheduler"

    def __init__(self) -> None:
        self._k = 0  # steps since the last sync
        self.parent_version: int | None = None
        self.staleness = 0
        self.battery: float | None = None
        self._deadline_left: int | None = None
        self._parent_model_since_sync = False
        self._synced_once = False

    @property
    def steps_since_sync(self) -> int:
        return self._k

    @abstractmethod
    def observe(self, step: StepObservation) -> Decision:
        """Take one finished step into account and say what to do next."""

    @abstractmethod
    def on_synced(self, cost_joules: float | None = None,
                  cost_seconds: float | None = None) -> None:
        """A sync finished, costing this much (None: not measured). Starts a new cycle."""

    def on_parent_model(self, version: int, parent_version_lag: int = 0) -> None:
        """The parent published model `version`.

        parent_version_lag: how many parent versions ahead that model is of the base our unsent
        progress is built on, *after* the caller handled the model: 0 when it rebased onto it
        (the device agent and the edge node always merge a new parent model in, so they pass 0),
        the true lag when it kept training on an older base. The lag lasts until the next sync
        (`on_synced` clears it: what we send then is built on the newest base we know) or the
        next call. It used to last forever: one late model made a scheduler sync at tau_min for
        the rest of the run.
        """
        v, lag = _as_float(version), _as_float(parent_version_lag)
        if math.isfinite(v):
            self.parent_version = int(v)
        self.staleness = int(min(max(lag, 0.0), 1e9)) if math.isfinite(lag) else self.staleness
        self._parent_model_since_sync = True

    def set_battery_reserve(self, fraction: float | None) -> None:
        """Charge left above the device's shutdown reserve, 0..1; None on mains power.

        A reading that is not a number is ignored (a glitching gauge must not stop training).
        """
        if fraction is None:
            self.battery = None
            return
        v = _as_float(fraction)
        if math.isfinite(v):
            self.battery = min(max(v, 0.0), 1.0)

    def set_deadline(self, steps_left: int | None) -> None:
        """The parent aggregates within `steps_left` of our steps; None clears the deadline.

        The sync is forced on the step that uses up the last of them (0: the next step).
        """
        if steps_left is None:
            self._deadline_left = None
            return
        v = _as_float(steps_left)
        if math.isfinite(v):
            self._deadline_left = int(min(max(v, 0.0), 1e9))

    def describe(self) -> str:
        return self.name

    # Shared bookkeeping for subclasses -------------------------------------------------------

    def _tick(self) -> None:
        self._k += 1
        if self._deadline_left is not None:
            self._deadline_left = max(0, self._deadline_left - 1)

    def _reset_cycle(self) -> None:
        self._k = 0
        self.staleness = 0  # what we just sent is built on the newest parent model we know
        self._deadline_left = None  # our update made it before the parent's aggregation
        self._parent_model_since_sync = False
        self._synced_once = True


# ---------------------------------------------------------------------------------------------
# Ours: the marginal value rule


@dataclass(frozen=True)
class MarginalConfig:
    window: int = 10  # steps in the slope fit: a 5-step minibatch loss drop is often below noise
    tau_min: int = 5  # never sync sooner: a slope from fewer noisy points ends cycles at random
    tau_max: int = 200  # always sync by then: bounds the client drift a local loss cannot see
    sync_cost_j: float = 5.0  # S before any measured sync (~1 MB adapter over Wi-Fi, both ways)
    cost_weight: float = 0.3  # EMA weight of the newest measured sync cost in S
    rate_weight: float = 0.3  # EMA weight of the newest cycle in the long-run average rate
    z: float = 1.0  # sync only when marginal + z*se <= average: a noisy dip must not end a cycle
    curve_t: float = 2.0  # |t| of the curvature above which the bending (quadratic) fit is used
    quad_min_n: int = 8  # fewest points for the bending fit: its t-test needs >= 5 residual dof
    max_staleness: int = 3  # V: parent this many versions ahead of our base => our work is stale
    battery_low: float = 0.15  # below this charge, end cycles at tau_min so progress is not lost
    allow_pause: bool = False  # pausing pays only where idle power << busy power (DESIGN §5)
    cheap_share: float = 0.1  # a sync costing <= this share of the energy its cycle trained is sent at once
    measure_first: bool = True  # end the first cycle at tau_min: S is a guess until one sync is measured
    min_step_j: float = 1e-6  # floor for a step's joules: zero-joule steps would collapse the fit

    def __post_init__(self) -> None:
        _check(self.window >= 3, "window", self.window, "must be >= 3 (a curve needs points)")
        _check(self.tau_min >= 1, "tau_min", self.tau_min, "must be >= 1")
        _check(self.tau_max >= self.tau_min, "tau_max", self.tau_max,
               f"must be >= tau_min={self.tau_min}")
        _check(_nonneg(self.sync_cost_j), "sync_cost_j", self.sync_cost_j, "must be finite, >= 0")
        _check(0.0 < self.cost_weight <= 1.0, "cost_weight", self.cost_weight, "must be in (0, 1]")
        _check(0.0 < self.rate_weight <= 1.0, "rate_weight", self.rate_weight, "must be in (0, 1]")
        _check(_nonneg(self.z), "z", self.z, "must be finite, >= 0")
        _check(_nonneg(self.curve_t), "curve_t", self.curve_t, "must be finite, >= 0")
        _check(self.quad_min_n >= 4, "quad_min_n", self.quad_min_n, "must be >= 4")
        _check(self.max_staleness >= 0, "max_staleness", self.max_staleness, "must be >= 0")
        _check(0.0 <= self.battery_low <= 1.0, "battery_low", self.battery_low, "must be in [0, 1]")
        _check(_nonneg(self.min_step_j) and self.min_step_j > 0, "min_step_j", self.min_step_j,
               "must be finite, > 0")
        _check(_nonneg(self.cheap_share) and self.cheap_share < 1, "cheap_share", self.cheap_share,
               "must be in [0, 1)")


class MarginalValueScheduler(SyncScheduler):
    """Sync when the loss-drop per joule of staying falls to the long-run average (Charnov's MVT).

    The rule, per step k of a cycle (a cycle runs from one sync to the next):
    - r_k, the marginal rate, is -d loss / d joule at the latest step: a weighted least-squares
      fit of loss against cumulative joules over the last `window` steps (quadratic when its
      curvature is significant, else a line; see `_local_fit`), with its standard error se.
    - the comparison rate is the long-run average R = EMA over past cycles of
      gain / (joules + S), gain = fitted loss at the cycle start (extrapolated to 0 J from its
      first steps) minus fitted loss at its end, S = the sync cost (EMA of measured costs).
      Before any cycle has finished, the current cycle's own gain_so_far / (e_k + S) stands in:
      for one kind of patch that is exactly the optimum's condition (the k maximising
      g(k)/(e_k + S) is where g' equals it), so the first cycle already stops in the right place.
      Cycles that lost ground count as rate 0: a negative average would say never leave.
    - sync when r_k + z*se <= R. The upper bound is deliberate: the test runs every step, so
      the point estimate would let the first noisy dip end a cycle (a sequential test with many
      looks is biased toward leaving early), and the average rate g/(e+S) falls steeply before
      its optimum but slowly after it, so leaving early costs more than leaving equally late.
      Simulated (exponential gain curves, Gaussian loss noise of 1-6 per-step drops at the
      optimum, 9 curve/cost settings), the worst setting reached 75-90% of the optimal rate with
      the point estimate (z=0) and 88-96% with z=1; z=1.5 and z=2 were no better.
      The price is patience on flat noisy curves, which tau_max bounds. (Staying too long has a
      cost the loss cannot see, client drift; the staleness rule and tau_max cover that.)
    - order of precedence: a parent deadline (even before tau_min), then tau_min, tau_max,
      staleness > V, low battery (flush at tau_min so a dying device does not strand its
      progress), then the rule.
    - pause (only with allow_pause): when we already synced since the parent's last model, the
      loss is confidently not falling (r + z*se <= 0: in practice a rising loss, since noise
      keeps the bound above 0 on a flat one) and the cycle gained nothing, another step only
      burns busy power and a sync would send nothing: idle until a parent model arrives.
      This rule pays for any idle power below busy power; the richer case DESIGN mentions
      (pause while gaining a little, to train on a fresher base) pays only with deep-sleep idle
      power, which the scheduler cannot see, so it is left out.
    Losses are taken as given: ORT reports a step's loss before its update, which shifts the
    curve by one step against the joules; that bias is well under the rule's resolution.
    """

    name = "marginal"

    def __init__(self, config: MarginalConfig | None = None) -> None:
        super().__init__()
        self.config = config or MarginalConfig()
        self._cycle = _Cycle(self.config.window)
        self.sync_cost_j = self.config.sync_cost_j
        self._cost_measured = False  # S is still the prior
        self.average_rate: float | None = None  # R, per joule
        self.cycles = 0
        self._step_j: float | None = None  # EMA of a step's joules (fallback for bad readings)
        self._step_s: float | None = None
        self._sync_s: float | None = None
        self._noise_var: float | None = None  # pooled residual variance of loss fits
        # A parent model merged in mid-cycle moves the loss by a step that is not our training's
        # doing (others' progress, or their non-IID drift): it is measured at the next step and
        # taken out of the loss series, so neither the marginal rate nor the cycle's gain sees it.
        self._merge_pending = False
        self._offset = 0.0  # sum of the jumps removed so far in this cycle
        self.merge_jumps: list[float] = []  # recent jumps, for telemetry and tests

    # -- events --------------------------------------------------------------------------------

    def observe(self, step: StepObservation) -> Decision:
        cfg = self.config
        joules, seconds, loss, weight = _sanitize(step, cfg.min_step_j, self._step_j)
        self._step_j = _ema(self._step_j, joules, 0.1)
        self._step_s = _ema(self._step_s, seconds, 0.1)
        if loss is not None:
            loss = self._remove_merge_jump(loss, joules)
        self._cycle.add(joules, seconds, loss, weight)
        self._tick()
        k = self._k
        est = self._estimate()
        numbers = est["numbers"]
        if loss is None:
            numbers["loss_missing"] = 1.0

        def decide(action: Action, reason: str) -> Decision:
            return Decision(action, reason, k, _clean_estimate(numbers))

        if self._deadline_left == 0:
            return decide("sync", f"parent deadline reached at k={k}")
        if k < cfg.tau_min:
            return decide("continue", f"k={k} < tau_min={cfg.tau_min}")
        if k >= cfg.tau_max:
            return decide("sync", f"tau_max={cfg.tau_max} reached")
        if self.staleness > cfg.max_staleness:
            return decide("sync", f"parent {self.staleness} versions ahead of our base "
                                  f"(> V={cfg.max_staleness}) at k={k}")
        if self.battery is not None and self.battery < cfg.battery_low:
            return decide("sync", f"battery {self.battery:.0%} < {cfg.battery_low:.0%}: "
                                  f"flush progress at k={k}")
        if cfg.measure_first and not self._synced_once:
            return decide("sync", f"first cycle ends at tau_min={cfg.tau_min}: measure the sync's cost")
        if self.sync_cost_j <= cfg.cheap_share * self._cycle.joules:
            return decide("sync", f"cheap sync: S {_fmt(self.sync_cost_j)} J <= {cfg.cheap_share:g} x "
                                  f"{_fmt(self._cycle.joules)} J trained since the last one, at k={k}")
        r, ucb, comp, tiny = est["marginal"], est["ucb"], est["compare"], est["tiny"]
        if r is None or comp is None:
            return decide("continue", f"collecting: {len(self._cycle.tail)} usable losses at k={k}")
        which = "avg" if self.average_rate is not None else "cycle avg"
        if (cfg.allow_pause and self._synced_once and not self._parent_model_since_sync
                and ucb <= tiny and est["gain"] <= tiny * self._cycle.joules):
            return decide("pause", f"loss not falling (marginal {_fmt(r)}/J) and nothing new to "
                                   f"send since our sync: wait for the parent's model")
        if ucb <= comp + tiny:
            return decide("sync", f"marginal {_fmt(r)}/J <= {which} {_fmt(comp)}/J at k={k}")
        return decide("continue", f"marginal {_fmt(r)}/J > {which} {_fmt(comp)}/J at k={k}")

    def on_parent_model(self, version: int, parent_version_lag: int = 0) -> None:
        super().on_parent_model(version, parent_version_lag)
        self._merge_pending = True

    def _remove_merge_jump(self, loss: float, joules: float) -> float:
        """The loss as if no parent model had been merged in this cycle (see `_offset`).

        The jump is the first loss after the merge minus where the fit of the points before it
        predicted this step's loss; with too few points for a fit, the jump is taken against the
        last loss seen. One minibatch's noise enters the offset: a fair price for not counting
        other devices' progress (or drift) as this device's gain or loss.
        """
        if self._merge_pending:
            self._merge_pending = False
            cfg = self.config
            end = self._cycle.end_fit(cfg.curve_t, self._noise_var or 0.0, cfg.quad_min_n)
            if end is not None:
                predicted = end.value + end.slope * joules
            elif self._cycle.tail:
                predicted = self._cycle.tail[-1][1]
            else:
                predicted = None
            if predicted is not None:
                jump = (loss - self._offset) - predicted
                self._offset += jump
                self.merge_jumps = (self.merge_jumps + [jump])[-20:]
        return loss - self._offset

    def on_synced(self, cost_joules: float | None = None,
                  cost_seconds: float | None = None) -> None:
        cfg = self.config
        self._offset = 0.0  # a new cycle starts from the loss as it is
        cost = _measured(cost_joules, _JOULE_LIMIT)
        if cost is not None:
            # the first measurement replaces the prior rather than averaging with it: a 5 J guess
            # against a 0.06 J Wi-Fi sync kept S wrong for several cycles (docs/evaluation.md §3)
            self.sync_cost_j = _ema(self.sync_cost_j if self._cost_measured else None, cost,
                                    cfg.cost_weight)
            self._cost_measured = True
        else:
            cost = self.sync_cost_j  # not measured: the estimate stands in for this cycle
        secs = _measured(cost_seconds, _SECOND_LIMIT)
        if secs is not None:
            self._sync_s = _ema(self._sync_s, secs, cfg.cost_weight)
        if self._cycle.steps > 0:
            gain = self._gain()
            if gain is not None:
                rate = max(gain, 0.0) / max(self._cycle.joules + cost, cfg.min_step_j)
                self.average_rate = _ema(self.average_rate, rate, cfg.rate_weight)
                self.cycles += 1
        self._cycle = _Cycle(cfg.window)
        self._reset_cycle()

    def describe(self) -> str:
        cfg = self.config
        avg = "none yet" if self.average_rate is None else f"{_fmt(self.average_rate)}/J"
        return (f"marginal value (Charnov): window={cfg.window}, tau in [{cfg.tau_min}, "
                f"{cfg.tau_max}], z={cfg.z}, S={_fmt(self.sync_cost_j)} J, average rate {avg} "
                f"after {self.cycles} cycles, V={cfg.max_staleness}, "
                f"battery_low={cfg.battery_low:.0%}, pause {'on' if cfg.allow_pause else 'off'}")

    # -- estimates -----------------------------------------------------------------------------

    def _fits(self) -> tuple[_Fit | None, _Fit | None]:
        cfg = self.config
        args = (cfg.curve_t, self._noise_var or 0.0, cfg.quad_min_n)
        return self._cycle.start_fit(*args), self._cycle.end_fit(*args)

    def _gain(self) -> float | None:
        start, end = self._fits()
        if start is None or end is None:
            return None
        return start.value - end.value

    def _estimate(self) -> dict[str, Any]:
        cfg = self.config
        cyc = self._cycle
        start, end = self._fits()
        if end is not None and end.n >= 5:  # pool the noise level (see _local_fit)
            self._noise_var = _ema(self._noise_var, end.resid_var, 0.1)
        s_j = self.sync_cost_j
        numbers: dict[str, float | None] = {
            "energy_j": cyc.joules,
            "sync_cost_j": s_j,
            "average_rate": self.average_rate,
            "cycles": float(self.cycles),
            "staleness": float(self.staleness),
            "battery": self.battery,
        }
        out: dict[str, Any] = {"numbers": numbers, "marginal": None, "ucb": None,
                               "compare": None, "gain": 0.0, "tiny": 0.0}
        if end is None or start is None:
            return out
        gain = start.value - end.value
        # a rate this small is rounding, not progress (a 1e-9 relative loss change over the
        # cycle): without it a flat loss reads as +1e-17/J and never falls to an average of 0
        level = max(abs(start.value), abs(end.value))
        tiny = 1e-9 * level / max(cyc.joules, cfg.min_step_j)
        r = -end.slope
        ucb = r + cfg.z * end.slope_se
        own = max(gain, 0.0) / max(cyc.joules + s_j, cfg.min_step_j)
        comp = self.average_rate if self.average_rate is not None else own
        numbers.update(
            marginal_rate=r, marginal_se=end.slope_se, marginal_ucb=ucb, compare_rate=comp,
            cycle_rate=own, gain=gain, loss_start=start.value, loss_now=end.value,
            fit_degree=float(end.degree), predicted_k=self._predict_k(r, ucb, comp, end),
        )
        if numbers["predicted_k"] is not None and self._step_s is not None:
            numbers["predicted_s"] = numbers["predicted_k"] * self._step_s
        if self._sync_s is not None:
            numbers["sync_cost_s"] = self._sync_s
        out.update(marginal=r, ucb=ucb, compare=comp, gain=gain, tiny=tiny)
        return out

    def _predict_k(self, r: float, ucb: float, comp: float, end: _Fit) -> float:
        """Steps at which this cycle should end if the fitted bend holds (telemetry only)."""
        cfg = self.config
        k = float(self._k)
        if ucb <= comp:
            return min(max(k, cfg.tau_min), cfg.tau_max)
        # r falls by `curvature` per joule on a convex curve; a straight fit predicts no end.
        if end.curvature <= 0.0 or not self._step_j:
            return float(cfg.tau_max)
        more_j = (ucb - comp) / end.curvature
        more_k = more_j / self._step_j
        return _finite(min(max(k + more_k, cfg.tau_min), cfg.tau_max), float(cfg.tau_max))


# ---------------------------------------------------------------------------------------------
# Baseline: fixed tau


@dataclass(frozen=True)
class FixedConfig:
    tau: int = 10  # local steps between syncs (FedAvg's E in steps, HierFAVG's kappa)

    def __post_init__(self) -> None:
        _check(self.tau >= 1, "tau", self.tau, "must be >= 1")


class FixedScheduler(SyncScheduler):
    """Sync every `tau` steps, whatever happens: the FedAvg / HierFAVG baseline."""

    name = "fixed"

    def __init__(self, config: FixedConfig | int | None = None) -> None:
        super().__init__()
        if isinstance(config, int):
            config = FixedConfig(tau=config)
        self.config = config or FixedConfig()

    def observe(self, step: StepObservation) -> Decision:
        self._tick()
        k, tau = self._k, self.config.tau
        action: Action = "sync" if k >= tau else "continue"
        return Decision(action, f"fixed tau={tau}" + ("" if action == "sync" else f", k={k}"),
                        k, {"tau": float(tau)})

    def on_synced(self, cost_joules: float | None = None,
                  cost_seconds: float | None = None) -> None:
        self._reset_cycle()

    def describe(self) -> str:
        return f"fixed tau={self.config.tau} (FedAvg / HierFAVG)"


# ---------------------------------------------------------------------------------------------
# Baseline: adaptive tau of Wang et al. (JSAC 2019)


@dataclass(frozen=True)
class AdaptiveConfig:
    tau_init: int = 10  # tau of the first cycles, before the estimates exist
    tau_max: int = 100  # the paper's search bound for tau
    lr: float = 0.01  # eta, the step size in the bound (only eta*phi and eta*beta matter)
    phi: float = 0.025  # the paper's control parameter phi (their experiments used 0.025)
    budget_j: float = 36_000.0  # the paper's resource budget R, here joules (10 Wh: a day's share)
    sync_cost_j: float = 5.0  # b before any measured sync
    weight: float = 0.3  # EMA weight of the newest cycle (the paper's moving averages)

    def __post_init__(self) -> None:
        _check(self.tau_max >= 1, "tau_max", self.tau_max, "must be >= 1")
        _check(1 <= self.tau_init <= self.tau_max, "tau_init", self.tau_init,
               f"must be in [1, tau_max={self.tau_max}]")
        _check(_nonneg(self.lr) and self.lr > 0, "lr", self.lr, "must be finite, > 0")
        _check(_nonneg(self.phi) and self.phi > 0, "phi", self.phi, "must be finite, > 0")
        _check(_nonneg(self.budget_j) and self.budget_j > 0, "budget_j", self.budget_j,
               "must be finite, > 0")
        _check(_nonneg(self.sync_cost_j), "sync_cost_j", self.sync_cost_j, "must be finite, >= 0")
        _check(0.0 < self.weight <= 1.0, "weight", self.weight, "must be in (0, 1]")


def _drift_unit(tau: int, eta_beta: float, lr: float) -> float:
    """h(tau) / delta = ((eta*beta + 1)^tau - 1)/beta - eta*tau (Wang et al., Theorem 1)."""
    beta = eta_beta / lr
    return max(0.0, (math.expm1(tau * math.log1p(eta_beta))) / beta - lr * tau)


def adaptive_gap(tau: int, *, eta_beta: float, drift: float, c: float, b: float, lr: float,
                 phi: float, budget: float) -> float:
    """The convergence-bound surrogate of Wang et al. that tau minimises.

    drift = rho * h(tau) / u(tau) with u = `_drift_unit`, i.e. rho*delta: the bound's drift term
    is rho*h(tau) = drift * u(tau). T = R*tau/(c*tau + b) local steps fit the budget R. Then
        gap = (1 + sqrt(1 + 4 T^2 phi eta rho h / tau)) / (2 T eta phi) + rho h
    as in the authors' control algorithm.
    """
    rho_h = drift * _drift_unit(tau, eta_beta, lr)
    t_steps = budget * tau / (c * tau + b)
    root = math.sqrt(max(0.0, 1.0 + 4.0 * t_steps**2 * phi * lr * rho_h / tau))
    return (1.0 + root) / (2.0 * t_steps * lr * phi) + rho_h


class AdaptiveScheduler(SyncScheduler):
    """Adaptive tau after Wang et al., "Adaptive Federated Learning in Resource Constrained Edge
    Computing Systems", IEEE JSAC 2019: after each sync, pick the tau in [1, tau_max] that
    minimises their convergence bound under the resource budget, then sync every tau steps.

    The paper estimates beta (smoothness), rho (Lipschitz) and delta (gradient divergence) from
    gradients and weights. A node here sees only losses and joules, so (simplifications):
    - beta: for gradient descent on a curve of curvature beta, successive loss drops shrink by
      (1 - eta*beta)^2 per step. The cycle's loss-vs-step fit gives that decay rate
      lambda = l''/(-l') (per step), so eta*beta = 1 - exp(-lambda/2), floored at 1e-6 when the
      curve does not bend (the authors floor beta too).
    - rho and delta appear in the bound only as the drift term rho*h(tau) = rho*delta*u(tau).
      The paper's lemma says local models drift from the global one by at most h(tau) after
      tau steps, costing at most rho*h(tau) in loss. We measure exactly that cost: the jump of
      our local loss when a cycle starts from the parent's model, compared with where our
      previous cycle of length tau_prev ended. So rho*delta = jump / u(tau_prev), averaged over
      cycles; no gradients needed. (Reported rho = sqrt(drop per step / eta), the gradient-norm
      of gradient descent, and delta = that product / rho, for telemetry only.)
    - c (per-step cost) and b (per-sync cost) are EMAs of measured joules; R is `budget_j`,
      fixed, as in the authors' code (not the remaining budget); the search is over
      [1, tau_max] instead of their [1, 10*tau_prev].
    - phi is their fixed control parameter; the bound uses eta*phi and eta*beta only, so eta
      (Adam's step is not gradient descent's anyway) sets the scale of phi, nothing else.
    Until a jump has been measured (it takes two cycles) tau stays at tau_init; a measured
    drift of zero (IID data) leaves only the cost of syncs in the bound, and tau goes to
    tau_max.
    """

    name = "adaptive"

    def __init__(self, config: AdaptiveConfig | None = None) -> None:
        super().__init__()
        self.config = config or AdaptiveConfig()
        self.tau = self.config.tau_init
        self._cycle = _Cycle(window=self.config.tau_max)  # a whole cycle: tau <= tau_max
        self._c: float | None = None
        self._b = self.config.sync_cost_j
        self._b_measured = False
        self._eta_beta: float | None = None
        self._drift: float | None = None  # rho*delta
        self._rho: float | None = None
        self._prev_end: float | None = None  # fitted loss where the previous cycle ended
        self._prev_len: int | None = None

    def observe(self, step: StepObservation) -> Decision:
        joules, seconds, loss, weight = _sanitize(step, 1e-6, self._c)
        self._c = _ema(self._c, joules, self.config.weight)
        self._cycle.add(1.0, seconds, loss, weight)  # x = step index, see _learn_from_cycle
        self._tick()
        k = self._k
        limit = min(self.tau, self.config.tau_max)
        action: Action = "sync" if k >= limit else "continue"
        reason = f"adaptive tau={self.tau} (Wang et al.)" + ("" if action == "sync" else f", k={k}")
        return Decision(action, reason, k, self._numbers())

    def on_synced(self, cost_joules: float | None = None,
                  cost_seconds: float | None = None) -> None:
        cfg = self.config
        cost = _measured(cost_joules, _JOULE_LIMIT)
        if cost is not None:  # as in the marginal rule, the first measurement replaces the prior
            self._b = _ema(self._b if self._b_measured else None, cost, cfg.weight)
            self._b_measured = True
        self._learn_from_cycle()
        self._cycle = _Cycle(window=cfg.tau_max)
        self._reset_cycle()
        self.tau = self._choose_tau()

    def describe(self) -> str:
        return (f"adaptive tau (Wang et al. JSAC 2019): tau={self.tau} in [1, "
                f"{self.config.tau_max}], budget {_fmt(self.config.budget_j)} J")

    def _learn_from_cycle(self) -> None:
        cfg = self.config
        # x is the step index here (observe adds 1 per step): the bound counts iterations
        x, y, w = _Cycle._arrays(self._cycle.tail)
        if len(x) < 3:
            return
        whole = _local_fit(x, y, w, float(np.median(x)), curve_t=0.0)  # shape of the cycle
        start = _local_fit(x[:10], y[:10], w[:10], 0.0, curve_t=2.0)
        end = _local_fit(x[-10:], y[-10:], w[-10:], float(x[-1]), curve_t=2.0)
        if whole is not None:
            drop = -whole.slope
            lam = whole.curvature / drop if drop > 0 and whole.curvature > 0 else 0.0
            eta_beta = max(-math.expm1(-min(lam, 20.0) / 2.0), 1e-6)
            self._eta_beta = _ema(self._eta_beta, eta_beta, cfg.weight)
            if drop > 0:
                self._rho = _ema(self._rho, math.sqrt(drop / cfg.lr), cfg.weight)
        if start is not None and self._prev_end is not None and self._prev_len:
            jump = max(0.0, start.value - self._prev_end)
            unit = _drift_unit(self._prev_len, self._eta_beta or 1e-6, cfg.lr)
            if unit > 0:
                self._drift = _ema(self._drift, jump / unit, cfg.weight)
        if end is not None:
            self._prev_end = end.value
        self._prev_len = self._cycle.steps

    def _choose_tau(self) -> int:
        cfg = self.config
        if self._c is None or self._eta_beta is None or self._drift is None:
            return self.tau  # the drift needs two cycles to be seen; until then keep tau_init
        gaps = [
            adaptive_gap(t, eta_beta=self._eta_beta, drift=self._drift, c=self._c, b=self._b,
                         lr=cfg.lr, phi=cfg.phi, budget=cfg.budget_j)
            for t in range(1, cfg.tau_max + 1)
        ]
        finite = [(g, t) for t, g in enumerate(gaps, start=1) if math.isfinite(g)]
        if not finite:
            return self.tau
        return min(finite)[1]  # ties go to the smaller tau (fewer steps of drift)

    def _numbers(self) -> dict[str, float]:
        delta = (self._drift / self._rho) if (self._drift is not None and self._rho) else None
        return _clean_estimate({
            "tau": float(self.tau), "step_cost_j": self._c, "sync_cost_j": self._b,
            "eta_beta": self._eta_beta, "rho_delta": self._drift, "rho": self._rho,
            "delta": delta,
        })


# ---------------------------------------------------------------------------------------------
# Building a scheduler from a spec string


def _nonneg(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _check(ok: bool, field_name: str, value: Any, why: str) -> None:
    if not ok:
        raise SchedulerConfigError(f"scheduler config {field_name}={value!r} {why}")


@dataclass(frozen=True)
class _Kind:
    config: type
    build: Callable[[Any], SyncScheduler]
    positional: str | None  # field a bare value sets, e.g. "fixed:10" -> tau


_KINDS: dict[str, _Kind] = {
    "marginal": _Kind(MarginalConfig, MarginalValueScheduler, None),
    "fixed": _Kind(FixedConfig, FixedScheduler, "tau"),
    "adaptive": _Kind(AdaptiveConfig, AdaptiveScheduler, None),
}


def _coerce(kind: str, name: str, default: Any, value: Any) -> Any:
    """Convert a spec or keyword value to the type of the field's default."""
    where = f"{kind} scheduler: {name}={value!r}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise SchedulerConfigError(f"{where} is not a yes/no value")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise SchedulerConfigError(f"{where} is not an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise SchedulerConfigError(f"{where} is not an integer") from None
    if isinstance(default, float):
        try:
            out = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            out = math.nan
        if not math.isfinite(out):
            raise SchedulerConfigError(f"{where} is not a finite number")
        return out
    return value


def make_scheduler(spec: str, **config: Any) -> SyncScheduler:
    """Build a scheduler from `kind[:key=value,...]`, e.g. "marginal", "fixed:10",
    "marginal:tau_min=2,tau_max=50", "adaptive:tau_max=40".

    Keyword arguments set config fields too (node config, e.g. a measured sync_cost_j); values
    written in the spec win over them, as the more specific choice. Unknown kinds, unknown keys
    and bad values raise SchedulerConfigError naming the bad part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SchedulerConfigError(f"scheduler spec {spec!r} is empty (choose {', '.join(_KINDS)})")
    kind_name, _, rest = spec.strip().partition(":")
    kind_name = kind_name.strip().lower()
    kind = _KINDS.get(kind_name)
    if kind is None:
        raise SchedulerConfigError(
            f"unknown scheduler {kind_name!r} in spec {spec!r} (choose {', '.join(_KINDS)})")
    defaults = {f.name: f.default for f in fields(kind.config) if f.default is not MISSING}
    values: dict[str, Any] = dict(config)
    if rest.strip():
        for part in rest.split(","):
            part = part.strip()
            key, eq, raw = part.partition("=")
            key = key.strip()
            if not eq:
                if kind.positional is None or not part:
                    raise SchedulerConfigError(
                        f"{kind_name} scheduler: {part!r} in spec {spec!r} needs key=value")
                key, raw = kind.positional, part
            values[key] = raw.strip()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise SchedulerConfigError(
            f"{kind_name} scheduler: unknown setting {unknown[0]!r} "
            f"(known: {', '.join(defaults)})")
    typed = {k: _coerce(kind_name, k, defaults[k], v) for k, v in values.items()}
    return kind.build(kind.config(**typed))
