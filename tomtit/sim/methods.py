"""The methods compared in one `tomtit simulate` run, and the grids the baselines are tuned on.

Every baseline gets its best setting from its grid, chosen per scenario on the first seed
(reached the target, then time, then energy; else the best accuracy), then run on the other
seeds; ours runs with one default for every scenario and gets no grid.
- fedavg: flat (devices -> cloud), synchronous rounds of tau local steps (McMahan et al. 2017).
- hierfavg: devices -> edges -> cloud, synchronous; edges average every kappa1 local steps,
  the cloud every kappa2 edge rounds (Liu et al., "Client-edge-cloud hierarchical federated
  learning", ICC 2020).
- adaptive: Wang et al.'s adaptive tau (IEEE JSAC 2019) at devices and edges, on the same
  buffered asynchronous aggregation as ours.
- async-fixed: the same buffered asynchronous aggregation with a fixed tau at devices and a
  fixed kappa at edges: separates what asynchrony gains from what the marginal rule gains.
- ours: the marginal-value rule (`marginal`, defaults) at devices and edges, asynchronous.
"""
from __future__ import annotations

from device_runtime.scheduler import DEVICE_SCHEDULER, EDGE_SCHEDULER
from tomtit.sim.engine import Setting

OURS = Setting("ours", "ours (marginal, untuned)", flat=False, synchronous=False,
               device_scheduler=DEVICE_SCHEDULER, edge_scheduler=EDGE_SCHEDULER)


# Small grids, chosen to fit the 2-core compute budget (docs/evaluation.md): each spans the
# short and the long end of its knob; the grid actually used is written into summary.json.
GRID_TAU = (5, 20)  # FedAvg local steps per round
GRID_HIER = ((5, 4), (20, 2))  # HierFAVG (kappa1 local steps per edge round, kappa2 edge rounds per cloud round)
GRID_PHI = (0.025,)  # Wang et al.'s control parameter (their experiments' value)
GRID_ASYNC = ((5, 4), (20, 4), (50, 2))  # asynchronous fixed (tau local steps, kappa absorbed updates per edge push)


def grids(children_per_edge: int, edges: int) -> dict[str, list[Setting]]:
    """Each baseline's grid. An edge "step" is one absorbed child update, so HierFAVG's kappa2
    edge rounds are kappa2 x children updates."""
    def hier(k1: int, k2: int) -> Setting:
        return Setting("hierfavg", f"hierfavg k1={k1},k2={k2}", flat=False, synchronous=True,
                       device_scheduler=f"fixed:{k1}", edge_scheduler=f"fixed:{k2 * children_per_edge}")

    def asyncf(tau: int, kappa: int) -> Setting:
        return Setting("async-fixed", f"async-fixed tau={tau},kappa={kappa}", flat=False, synchronous=False,
                       device_scheduler=f"fixed:{tau}", edge_scheduler=f"fixed:{kappa}")

    return {
        "fedavg": [Setting("fedavg", f"fedavg tau={t}", flat=True, synchronous=True, device_scheduler=f"fixed:{t}")
                   for t in GRID_TAU],
        "hierfavg": [hier(k1, k2) for k1, k2 in GRID_HIER],
        "adaptive": [Setting("adaptive", f"adaptive phi={phi}", flat=False, synchronous=False,
                             device_scheduler=f"adaptive:phi={phi}", edge_scheduler=f"adaptive:phi={phi},tau_init=4")
                     for phi in GRID_PHI],
        "async-fixed": [asyncf(t, k) for t, k in GRID_ASYNC],
        "ours": [OURS],
    }


METHODS = ("fedavg", "hierfavg", "adaptive", "async-fixed", "ours")
