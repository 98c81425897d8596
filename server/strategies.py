"""Flower's strategies by name, configured from RunSettings; none is re-implemented here.

Server-side optimiser state (FedAdam/FedYogi moments, FedAvgM momentum) is exported and restored as plain
arrays so a restarted server resumes with the same state (see server/checkpoint.py).
"""
from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy,
)

from client.settings import RunSettings


def build_strategy(s: RunSettings) -> Strategy:
    common = dict(fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
                  min_train_nodes=s.min_train_nodes, min_evaluate_nodes=s.min_evaluate_nodes,
                  min_available_nodes=s.min_available_nodes)
    fedopt = dict(eta=s.fedopt_eta, eta_l=s.lr, beta_1=s.fedopt_beta_1, beta_2=s.fedopt_beta_2, tau=s.fedopt_tau)
    builders = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=s.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **fedopt),
        "fedyogi": lambda: FedYogi(**common, **fedopt),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=s.fedavgm_server_lr,
                                   server_momentum=s.fedavgm_momentum),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=s.trimmed_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=s.krum_malicious_nodes),
    }
    return builders[s.strategy]()


def strategy_params(s: RunSettings) -> dict:
    """The strategy's own parameters, for provenance."""
    return {
        "fedprox": {"proximal_mu": s.proximal_mu},
        "fedadam": {"eta": s.fedopt_eta, "beta_1": s.fedopt_beta_1, "beta_2": s.fedopt_beta_2, "tau": s.fedopt_tau},
        "fedyogi": {"eta": s.fedopt_eta, "beta_1": s.fedopt_beta_1, "beta_2": s.fedopt_beta_2, "tau": s.fedopt_tau},
        "fedavgm": {"server_learning_rate": s.fedavgm_server_lr, "server_momentum": s.fedavgm_momentum},
        "fedtrimmedavg": {"beta": s.trimmed_beta},
        "krum": {"num_malicious_nodes": s.krum_malicious_nodes},
    }.get(s.strategy, {})


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


def restore_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    strategy = getattr(strategy, "strategy", strategy)  # inside a central-DP wrapper (server/privacy.py)
    for attr in ("m_t", "v_t"):
        part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
        if part:
            setattr(strategy, attr, part)
    mv = [state[k] for k in sorted(k for k in state if k.startswith("momentum_vector/"))]
    if mv:
        strategy.momentum_vector = mv  # type: ignore[attr-defined]
