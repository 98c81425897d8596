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

from client.settings import RunSettings

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


def provenance(s: RunSettings, nodes: dict[str, dict]) -> dict:
    """What the bundle states about privacy: client DP-SGD (final epsilon, delta per hospital) and central DP."""
    per = {site: {"epsilon": n["dp"]["epsilon"], "delta": n["dp"]["delta"],
                  "declined_rounds": n["dp"]["declined_rounds"]} for site, n in nodes.items() if "dp" in n}
    out: dict = {"enabled": s.dp_enabled, "central": central_params(s)}
    if s.dp_enabled:
        out["client_dp_sgd"] = {
            "per_hospital": per, "target_epsilon": s.dp_target_epsilon or None,
            "noise_multiplier": s.dp_noise_multiplier or None, "max_grad_norm": s.dp_max_grad_norm,
            "accountant": s.dp_accountant, "sampling": "Poisson (Opacus DPDataLoader)",
            "note": "epsilon as reported by each hospital's Opacus accountant; a patient's guarantee is that of "
                    "the hospital holding their images"}
    return out


def worst_epsilon(nodes: dict[str, dict]) -> float | None:
    eps = [n["dp"]["epsilon"] for n in nodes.values() if "dp" in n]
    return max(eps) if eps else None


def central_params(s: RunSettings) -> dict | None:
    if s.central_dp == "off":
        return None
    p = {"mode": s.central_dp, "noise_multiplier": s.central_dp_noise_multiplier,
         "num_sampled_clients": s.min_train_nodes}
    if s.central_dp.endswith("fixed"):
        p["clipping_norm"] = s.central_dp_clipping_norm
    else:
        p.update(initial_clipping_norm=s.central_dp_clipping_norm, target_clipped_quantile=s.central_dp_target_quantile,
                 clip_norm_lr=s.central_dp_clip_lr)
    return p


def wrap_central_dp(strategy: Strategy, s: RunSettings) -> Strategy:
    """The base strategy inside Flower's central-DP wrapper named by `central-dp` (unchanged when 'off').

    Noise std = noise_multiplier x clipping norm / num_sampled_clients (min-train-nodes): with more nodes
    sampled than that, the noise is larger than needed, never smaller. The client-side modes need the
    matching Flower mod on the ClientApp (client/mods.py adds it from the same run config).
    """
    if s.central_dp == "off":
        return strategy
    noise, clip, m = s.central_dp_noise_multiplier, s.central_dp_clipping_norm, s.min_train_nodes
    adaptive = dict(initial_clipping_norm=clip, target_clipped_quantile=s.central_dp_target_quantile,
                    clip_norm_lr=s.central_dp_clip_lr)
    return {
        "server-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(strategy, noise, clip, m),
        "client-fixed": lambda: DifferentialPrivacyClientSideFixedClipping(strategy, noise, clip, m),
        "server-adaptive": lambda: DifferentialPrivacyServerSideAdaptiveClipping(strategy, noise, m, **adaptive),
        "client-adaptive": lambda: DifferentialPrivacyClientSideAdaptiveClipping(strategy, noise, m, **adaptive),
    }[s.central_dp]()
