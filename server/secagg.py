"""Secure aggregation with Flower's SecAgg+ workflow: the server only ever sees the sum of the hospitals'
masked, quantised updates, never one hospital's weights.

Flower 1.42 ships SecAgg+ only on the legacy path (`flwr.server.workflow.SecAggPlusWorkflow` inside a
`DefaultWorkflow`, driven by a legacy `flwr.server.strategy.FedAvg` through a `LegacyContext`); the new
`flwr.serverapp.strategy` classes have no SecAgg+ hook. So this module runs that workflow with the same
round hook (`evaluate_fn`: global evaluation, best round, checkpoint) as the Message-API strategies, and
client/mods.py adapts the legacy records on the hospital side. What is masked and summed is each hospital's
update scaled per array (client/mods.py `secagg_scales`); `_Checked` turns the aggregate back into the
global model, in the global model's dtypes. Costs and limits (measured in tests/test_security.py and
benchmarks/sections/secagg.py): every scaled update value is clipped to +/- secagg.clipping_range and
quantised to 2^22 levels (hospitals count and report what they clip); each hospital adds one pseudo-random
mask per neighbour over the whole model; the stage messages add up to about twice FedAvg's bytes.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.serverapp import Grid

from client.mods import PARAM_NAMES, SECAGG_CLIPPED, secagg_scales
from common.errors import FedxrayError
from common.settings import Settings

log = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, n: int, poll: float = 0.5) -> None:
    """Return once `n` nodes are connected; GuardedGrid.get_node_ids raises after federation.node_wait_timeout."""
    while len(list(grid.get_node_ids())) < n:
        time.sleep(poll)


def run_secagg(grid: Grid, s: Settings, initial: ArrayRecord, num_rounds: int, config: dict,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]):
    """`num_rounds` FedAvg rounds whose aggregation is SecAgg+; returns the legacy strategy (for its state)."""
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    names = list(initial.keys())
    fit_config = {k: (",".join(v) if isinstance(v, list) else v) for k, v in config.items()}
    fit_config[PARAM_NAMES] = ",".join(names)

    def on_fit_config(server_round: int) -> dict:
        return {**fit_config, "server-round": server_round}

    def evaluate(server_round: int, ndarrays, _cfg):
        if hasattr(grid, "replies"):   # GuardedGrid
            grid.replies = merge_stage_rows(grid.replies, server_round)
        arrays = ArrayRecord({n: Array(a) for n, a in zip(names, ndarrays, strict=True)})
        metrics = evaluate_fn(server_round, arrays)
        return 0.0, dict(metrics or {})

    strategy = LegacyFedAvg(
        fraction_fit=s.federation.fraction_train, fraction_evaluate=0.0, min_fit_clients=s.federation.min_train_nodes,
        min_available_clients=s.federation.min_available_nodes, on_fit_config_fn=on_fit_config, evaluate_fn=evaluate,
        initial_parameters=ndarrays_to_parameters(initial.to_numpy_ndarrays()))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=num_rounds, round_timeout=s.federation.round_timeout),
                            strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=_Checked(SecAggPlusWorkflow(
        num_shares=s.secagg.num_shares, reconstruction_threshold=s.secagg.reconstruction_threshold,
        clipping_range=s.secagg.clipping_range, max_weight=s.secagg.max_weight, timeout=s.federation.round_timeout), names))
    wait_for_nodes(grid, max(s.federation.min_available_nodes, s.federation.min_train_nodes))
    workflow(grid, context)
    return strategy


def merge_stage_rows(rows: list[dict], server_round: int) -> list[dict]:
    """One train row per hospital for the round, as the Message-API strategies leave: the stage whose reply
    carries the hospital's metrics, with the bytes of all four stages; a hospital that clipped is warned of."""
    train = [r for r in rows if r["type"] == "train"]
    sent: dict[int, int] = defaultdict(int)
    for r in train:
        sent[r["node_id"]] += r.get("bytes_up", 0)
    kept = [r for r in train if "num-examples" in r.get("metrics", {}) or not r["ok"]]
    for r in kept:
        if r["ok"]:
            r["bytes_up"] = sent[r["node_id"]]
        if r.get("metrics", {}).get(SECAGG_CLIPPED):
            log.warning("round %d: %s clipped %d values of its update under SecAgg+: the global model is not "
                        "FedAvg's; raise secagg.clipping_range", server_round, r.get("site") or f"node {r['node_id']}",
                        int(r["metrics"][SECAGG_CLIPPED]))
    return [r for r in rows if r["type"] != "train"] + kept


class _Checked:
    """Turns SecAgg+'s aggregate (the example-weighted mean of the scaled updates) into the next global model,
    global + scale x aggregate in the global model's dtypes (Flower's aggregate is float64; downloads would
    double). SecAgg+ logs 'Secure aggregation halted' and returns when too few hospitals answer: stop the run
    then instead of evaluating and checkpointing an unchanged model as if the round had happened."""

    def __init__(self, workflow, names: list[str]):
        self.workflow, self.names = workflow, names   # state-dict names: legacy records are keyed by position

    def __call__(self, grid: Grid, context) -> None:
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        before = context.state.array_records[MAIN_PARAMS_RECORD]
        self.workflow(grid, context)
        after = context.state.array_records[MAIN_PARAMS_RECORD]
        if after is before:
            raise FedxrayError("SecAgg+ round halted: fewer hospitals answered every stage than "
                               f"secagg.reconstruction_threshold ({self.workflow.reconstruction_threshold}) needs; "
                               "see the ServerApp log and the SuperNode logs")
        context.state.array_records[MAIN_PARAMS_RECORD] = apply_update(before, after, self.names)


def apply_update(global_arrays: ArrayRecord, aggregate: ArrayRecord, names: list[str]) -> ArrayRecord:
    """global + secagg_scales(global) x aggregate, array by array, cast back to each global array's dtype
    (integers rounded). Legacy records are keyed by position: `names` are the state-dict names in that order."""
    g = global_arrays.to_numpy_ndarrays()
    u = aggregate.to_numpy_ndarrays()
    if not len(g) == len(u) == len(names):
        raise FedxrayError(f"SecAgg+ aggregate has {len(u)} arrays, the global model {len(g)}, names {len(names)}")
    keys = list(global_arrays.keys())
    by_name = secagg_scales(dict(zip(names, g, strict=True)))
    scales = [by_name[n] for n in names]
    out = {}
    for k, a, d, scale in zip(keys, g, u, scales, strict=True):
        new = a.astype(np.float64) + scale * d.reshape(a.shape).astype(np.float64)
        out[k] = Array(np.asarray(np.rint(new) if a.dtype.kind in "iub" else new).astype(a.dtype))
    return ArrayRecord(out)
