"""Flower's strategies by name, configured from Settings; none is re-implemented here.

BatchNorm's running statistics travel with the weights but are not weights: a server optimiser (FedAdam,
FedYogi's adaptive step, FedAvgM's momentum) would move running_var by eta per round or overshoot it below
zero, and every strategy's arithmetic turns the int64 `num_batches_tracked` into float64. So each strategy
is Flower's class with one thin layer (`_RunningStatistics`): after Flower aggregates, the running
statistics of the optimiser strategies are replaced by the plain example-weighted average of the hospitals'
statistics (the robust ones keep their median/trimmed/Krum statistics), and every array gets its wire dtype
back. The layer reads the replies before Flower aggregates: FedMedian and FedTrimmedAvg `pop` every array out
of the replies they aggregate, leaving them empty (read afterwards, `num_batches_tracked` came back float64,
and in round 2 every hospital's int64 reply was rejected as unlike the global model).

The robust strategies need enough hospitals per round to be robust (FederationConfig.replies_needed, checked
against federation.min_train_nodes when the settings are read): Krum n > 2f + 2, FedTrimmedAvg int(beta * n) >= 1,
FedMedian n >= 3. A round that still gets fewer (hospitals lost or rejected) is aggregated with a warning.

Server-side optimiser state (FedAdam/FedYogi moments, FedAvgM momentum) is exported and restored as plain
arrays so a restarted server resumes with the same state (see server/checkpoint.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.models import is_running_statistic
from common.settings import Settings

log = logging.getLogger(__name__)
SERVER_OPTIMISERS = (FedAdam, FedYogi, FedAvgM)


class _RunningStatistics:
    """Mixed in before a Flower strategy: see the module docstring. Parameters are left exactly as Flower
    aggregated them."""

    average_statistics = False
    # rounds done before a resume (set by restore_state): Flower's start() counts from 1 again, and FedAdam's
    # bias correction must not restart with it
    round_offset = 0
    replies_needed = (1, "")   # FederationConfig.replies_needed: checked against federation.min_train_nodes at start, warned here


    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m.content for m in replies if not m.has_error() and m.has_content() and m.content.array_records]
        # Read the replies BEFORE Flower aggregates them: FedMedian and FedTrimmedAvg `pop` every array out of
        # the replies' ArrayRecords, so afterwards they are empty (wire dtypes lost, nothing left to average).
        wire = {k: np.dtype(a.dtype) for k, a in next(iter(valid[0].array_records.values())).items()} if valid else {}
        stats = [k for k in wire if is_running_statistic(k)]
        only = [RecordDict({"arrays": ArrayRecord({k: next(iter(c.array_records.values()))[k] for k in stats}),
                            "metrics": next(iter(c.metric_records.values()))})
                for c in valid] if self.average_statistics and stats else []
        if 0 < len(valid) < self.replies_needed[0]:
            log.warning("round %d: %s aggregates %d replies, fewer than the %d it needs (%s): this round it protects "
                        "less than configured", server_round + self.round_offset, type(self).__name__, len(valid),
                        *self.replies_needed)
        arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)  # type: ignore[misc]
        if arrays is None or not valid:
            return arrays, metrics
        out = {k: v.numpy() for k, v in arrays.items()}
        if only:
            out.update({k: v.numpy() for k, v in aggregate_arrayrecords(only, self.weighted_by_key).items()})
        for k, v in out.items():
            dtype = wire.get(k, v.dtype)
            out[k] = (np.rint(v) if np.issubdtype(dtype, np.integer) else v).astype(dtype, copy=False)
        result = ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})
        if isinstance(getattr(self, "current_arrays", None), ArrayRecord):
            self.current_arrays = result   # FedAvgM steps from its own last result, not configure_train's
        return result, metrics


def mean_of_defined(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's example-weighted mean of the hospitals' metrics (`aggregate_metricrecords`), except that a
    value a hospital could not compute (NaN: AUC on a split without positives) is left out of that value's
    mean instead of making the federation's mean NaN. A value no hospital could compute stays NaN."""
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    is_list: dict[str, bool] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weighting_metric_name])
        for key, value in metrics.items():
            if key == weighting_metric_name:
                continue
            v = np.atleast_1d(np.asarray(value, dtype=np.float64))
            defined = np.isfinite(v)
            sums[key] = sums.get(key, 0.0) + np.where(defined, w * v, 0.0)
            weights[key] = weights.get(key, 0.0) + np.where(defined, w, 0.0)
            is_list[key] = isinstance(value, list)
    out = MetricRecord()
    for key, total in sums.items():
        mean = np.divide(total, weights[key], out=np.full_like(total, np.nan), where=weights[key] > 0)
        out[key] = [float(x) for x in mean] if is_list[key] else float(mean[0])
    return out


def _flower(cls: type[Strategy]) -> type[Strategy]:
    """`cls` with the running-statistics layer; still an instance of Flower's class."""
    return type(cls.__name__, (_RunningStatistics, cls),
                {"__module__": __name__, "average_statistics": issubclass(cls, SERVER_OPTIMISERS),
                 "__doc__": f"Flower's {cls.__name__}; running statistics handled as in server/strategies.py."})


def build_strategy(s: Settings) -> Strategy:
    f = s.federation
    # Hospitals that keep no patients out of training (local_split=train) have nothing to evaluate on.
    fraction_evaluate = 0.0 if f.local_split == "train" else f.fraction_evaluate
    common = dict(fraction_train=f.fraction_train, fraction_evaluate=fraction_evaluate,
                  min_train_nodes=f.min_train_nodes, min_evaluate_nodes=f.min_evaluate_nodes,
                  min_available_nodes=f.min_available_nodes,
                  train_metrics_aggr_fn=mean_of_defined, evaluate_metrics_aggr_fn=mean_of_defined)
    fedopt = dict(eta=f.fedopt_eta, eta_l=s.train.lr, beta_1=f.fedopt_beta_1, beta_2=f.fedopt_beta_2, tau=f.fedopt_tau)
    builders = {
        "fedavg": lambda: _flower(FedAvg)(**common),
        "fedprox": lambda: _flower(FedProx)(**common, proximal_mu=f.proximal_mu),
        "fedadam": lambda: _flower(FedAdam)(**common, **fedopt),
        "fedyogi": lambda: _flower(FedYogi)(**common, **fedopt),
        "fedavgm": lambda: _flower(FedAvgM)(**common, server_learning_rate=f.fedavgm_server_lr,
                                            server_momentum=f.fedavgm_momentum),
        "fedmedian": lambda: _flower(FedMedian)(**common),
        "fedtrimmedavg": lambda: _flower(FedTrimmedAvg)(**common, beta=f.trimmed_beta),
        "krum": lambda: _flower(Krum)(**common, num_malicious_nodes=f.krum_malicious_nodes),
    }
    strategy = builders[f.strategy]()
    strategy.replies_needed = f.replies_needed
    return strategy


def strategy_params(s: Settings) -> dict:
    """The strategy's own parameters, for provenance."""
    f = s.federation
    fedopt = {"eta": f.fedopt_eta, "beta_1": f.fedopt_beta_1, "beta_2": f.fedopt_beta_2, "tau": f.fedopt_tau}
    return {
        "fedprox": {"proximal_mu": f.proximal_mu},
        "fedadam": fedopt,
        "fedyogi": fedopt,
        "fedavgm": {"server_learning_rate": f.fedavgm_server_lr, "server_momentum": f.fedavgm_momentum},
        "fedtrimmedavg": {"beta": f.trimmed_beta},
        "krum": {"num_malicious_nodes": f.krum_malicious_nodes},
    }.get(f.strategy, {})


def export_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Server-optimiser arrays worth checkpointing ({} for stateless strategies)."""
    out: dict[str, np.ndarray] = {}
    strategy = getattr(strategy, "strategy", strategy)  # inside a central-DP wrapper (server/privacy.py)
    for attr in ("m_t", "v_t"):  # FedOpt family: dict[name, ndarray]
        for k, v in (getattr(strategy, attr, None) or {}).items():
            out[f"{attr}/{k}"] = np.asarray(v)
    for i, v in enumerate(getattr(strategy, "momentum_vector", None) or []):  # FedAvgM: list[ndarray]
        out[f"momentum_vector/{i:06d}"] = np.asarray(v)
    return out


def restore_state(strategy: Strategy, state: dict[str, np.ndarray], rounds_done: int = 0) -> None:
    """Put a checkpoint's optimiser state back, and number the next round rounds_done + 1 for the optimiser."""
    strategy = getattr(strategy, "strategy", strategy)  # inside a central-DP wrapper (server/privacy.py)
    if isinstance(strategy, _RunningStatistics):
        strategy.round_offset = rounds_done
    for attr in ("m_t", "v_t"):
        part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
        if part:
            setattr(strategy, attr, part)
    mv = [state[k] for k in sorted(k for k in state if k.startswith("momentum_vector/"))]
    if mv:
        strategy.momentum_vector = mv  # type: ignore[attr-defined]
