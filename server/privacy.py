"""The server's side of privacy: epsilon per hospital per round, the final (epsilon, delta) of every hospital
for the bundle's provenance, and Flower's central-DP strategy wrappers selected by run config.

Client-side DP-SGD (Opacus) is accounted by each hospital (client/privacy.py); the server only records what
the hospitals report, since it cannot verify it. A hospital that declines a round (budget exhausted) replies
with an Error that names its site and epsilon; GuardedGrid hands the strategy only real updates, so the round
goes on with the other hospitals (Flower's central-DP wrappers would otherwise skip a round with any error).
"""
from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from client.privacy import dp_trainable, is_pretrained
from common.settings import Settings

TRAIN = "train"


def record_round(nodes: dict[str, dict], replies: list[dict], server_round: int) -> dict[str, dict]:
    """{site: {epsilon, delta, declined}} of this round's train replies; also kept in `nodes[site]['dp']`."""
    site_of = {nid: site for site, n in nodes.items() for nid in n.get("node_ids", [])}
    out: dict[str, dict] = {}
    for r in replies:
        if r["type"] != TRAIN:
            continue
        if r["ok"]:
            m = r.get("metrics", {})
            if "dp-epsilon" not in m:
                continue
            site = r.get("site") or site_of.get(r["node_id"], str(r["node_id"]))
            info = {"epsilon": float(m["dp-epsilon"]), "delta": float(m["dp-delta"]), "declined": False}
        else:
            failure = r.get("failure") or {}
            if failure.get("code") != "dp-budget-spent":
                continue
            d = failure.get("detail", {})
            site = failure.get("site") or site_of.get(r["node_id"], str(r["node_id"]))
            info = {"epsilon": float(d["dp-epsilon"]), "delta": float(d["dp-delta"]), "declined": True}
        out[site] = info
        node = nodes.setdefault(site, {"node_ids": [r["node_id"]], "rounds": [], "examples": 0})
        dp = node.setdefault("dp", {"epsilon_by_round": {}, "declined_rounds": []})
        dp.update(epsilon=info["epsilon"], delta=info["delta"])
        dp["epsilon_by_round"][str(server_round)] = info["epsilon"]
        if info["declined"]:
            dp["declined_rounds"].append(server_round)
    return out


def provenance(s: Settings, nodes: dict[str, dict]) -> dict:
    """What the bundle states about privacy: client DP-SGD (final epsilon, delta per hospital) and central DP."""
    per = {site: {"epsilon": n["dp"]["epsilon"], "delta": n["dp"]["delta"],
                  "declined_rounds": n["dp"]["declined_rounds"]} for site, n in nodes.items() if "dp" in n}
    out: dict = {"enabled": s.privacy.enabled, "central": central_params(s)}
    if s.privacy.enabled:
        out["client_dp_sgd"] = {
            "per_hospital": per, "target_epsilon": s.privacy.target_epsilon or None,
            "noise_multiplier": s.privacy.noise_multiplier or None, "max_grad_norm": s.privacy.max_grad_norm,
            "accountant": s.privacy.accountant, "sampling": "Poisson (Opacus DPDataLoader)",
            "trainable": dp_trainable(s.privacy, is_pretrained(s.model.weights)),
            "grad_sample_mode": s.privacy.grad_sample_mode,
            "note": "epsilon as reported by each hospital's Opacus accountant; a patient's guarantee is that of "
                    "the hospital holding their images"}
    return out


def worst_epsilon(nodes: dict[str, dict]) -> float | None:
    eps = [n["dp"]["epsilon"] for n in nodes.values() if "dp" in n]
    return max(eps) if eps else None


def central_params(s: Settings) -> dict | None:
    if s.central_dp.mode == "off":
        return None
    p = {"mode": s.central_dp.mode, "noise_multiplier": s.central_dp.noise_multiplier,
         "num_sampled_clients": s.federation.min_train_nodes}
    if s.central_dp.mode.endswith("fixed"):
        p["clipping_norm"] = s.central_dp.clipping_norm
    else:
        p.update(initial_clipping_norm=s.central_dp.clipping_norm, target_clipped_quantile=s.central_dp.target_quantile,
                 clip_norm_lr=s.central_dp.clip_lr)
    return p


def wrap_central_dp(strategy: Strategy, s: Settings) -> Strategy:
    """The base strategy inside Flower's central-DP wrapper named by `central_dp.mode` (unchanged when 'off').

    Noise std = noise_multiplier x clipping norm / num_sampled_clients (federation.min_train_nodes): with more nodes
    sampled than that, the noise is larger than needed, never smaller. The client-side modes need the
    matching Flower mod on the ClientApp (client/mods.py adds it from the same run config).
    """
    if s.central_dp.mode == "off":
        return strategy
    noise, clip, m = s.central_dp.noise_multiplier, s.central_dp.clipping_norm, s.federation.min_train_nodes
    adaptive = dict(initial_clipping_norm=clip, target_clipped_quantile=s.central_dp.target_quantile,
                    clip_norm_lr=s.central_dp.clip_lr)
    return {
        "server-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(strategy, noise, clip, m),
        "client-fixed": lambda: DifferentialPrivacyClientSideFixedClipping(strategy, noise, clip, m),
        "server-adaptive": lambda: DifferentialPrivacyServerSideAdaptiveClipping(strategy, noise, m, **adaptive),
        "client-adaptive": lambda: DifferentialPrivacyClientSideAdaptiveClipping(strategy, noise, m, **adaptive),
    }[s.central_dp.mode]()
