"""Secure aggregation with Flower's SecAgg+ workflow: the server only ever sees the sum of the hospitals'
masked, quantised updates, never one hospital's weights.

Flower 1.42 ships SecAgg+ only on the legacy path (`flwr.server.workflow.SecAggPlusWorkflow` inside a
`DefaultWorkflow`, driven by a legacy `flwr.server.strategy.FedAvg` through a `LegacyContext`); the new
`flwr.serverapp.strategy` classes have no SecAgg+ hook. So this module runs that workflow with the same
round hook (`evaluate_fn`: global evaluation, best round, checkpoint) as the Message-API strategies, and
client/mods.py adapts the legacy records on the hospital side. Costs and limits (measured in
tests/test_security.py and the README): every weight is clipped to +/- secagg.clipping_range and quantised
to 2^22 levels; each hospital adds one pseudo-random mask per neighbour over the whole model.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.serverapp import Grid

from client.mods import PARAM_NAMES
from common.settings import Settings
from common.errors import FedxrayError


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
        if hasattr(grid, "replies"):  # GuardedGrid: keep the stage whose replies carry the hospital's metrics
            grid.replies = [r for r in grid.replies if r["type"] != "train" or r.get("site")]
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
        clipping_range=s.secagg.clipping_range, max_weight=s.secagg.max_weight, timeout=s.federation.round_timeout)))
    wait_for_nodes(grid, max(s.federation.min_available_nodes, s.federation.min_train_nodes))
    workflow(grid, context)
    return strategy


class _Checked:
    """SecAgg+ logs 'Secure aggregation halted' and returns when too few hospitals answer; stop the run then
    instead of evaluating and checkpointing an unchanged model as if the round had happened."""

    def __init__(self, workflow):
        self.workflow = workflow

    def __call__(self, grid: Grid, context) -> None:
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        before = context.state.array_records[MAIN_PARAMS_RECORD]
        self.workflow(grid, context)
        if context.state.array_records[MAIN_PARAMS_RECORD] is before:
            raise FedxrayError("SecAgg+ round halted: fewer hospitals answered every stage than "
                               f"secagg.reconstruction_threshold ({self.workflow.reconstruction_threshold}) needs; "
                               "see the ServerApp log and the SuperNode logs")
