"""What each named strategy computes, through the product's own construction (server/strategies.py build_strategy,
i.e. Flower's class with the running-statistics layer) on hand-made replies built with Flower's Message API.

Expected values are worked out by hand in the comments (or, for the server optimisers, from the update rule
written out here), never by calling the strategy's own helpers: a strategy mapped to the wrong Flower class,
given the wrong parameter, or replaced by a mean fails here.
"""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.settings import Settings
from server.strategies import build_strategy
from tests.conftest import StandInGrid

pytestmark = pytest.mark.usefixtures("task_identity")   # Messages made outside a Flower runtime


def _settings(**federation) -> Settings:
    """The demo settings with one strategy's [federation] fields (the one place this file names settings)."""
    n = federation.pop("nodes", 2)
    return Settings.build("demo", {"federation": {"min_train_nodes": n, "min_available_nodes": n,
                                                  "min_evaluate_nodes": 0, **federation}})


def _round(strategy, current: dict[str, np.ndarray], replies: list[tuple[dict[str, np.ndarray], int]],
           server_round: int = 1) -> dict[str, np.ndarray]:
    """One round as the ServerApp plays it: configure_train on the global arrays, then aggregate_train on one
    reply (arrays, num-examples) per instruction, in the order the instructions came out."""
    grid = StandInGrid(list(range(1, len(replies) + 1)))
    msgs = list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                         ConfigRecord(), grid))
    assert len(msgs) == len(replies)
    answers = [Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in a.items()}),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=m)
               for m, (a, n) in zip(msgs, replies, strict=True)]
    arrays, _ = strategy.aggregate_train(server_round, answers)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


W = lambda *v: {"w": np.array(v, np.float32)}  # noqa: E731   one reply's only array, one value per coordinate
ZERO = {"w": np.zeros(3, np.float32)}


# ------------------------------------------------------------------------------------------------ averages
@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_aggregate_the_example_weighted_mean(name):
    # (10 x 1 + 30 x 5 + 60 x 2) / 100 = 2.8;  (10 x -2 + 30 x 0 + 60 x 4) / 100 = 2.2;  all 7 -> 7
    strategy = build_strategy(_settings(strategy=name, proximal_mu=0.25 if name == "fedprox" else 0.0))
    out = _round(strategy, ZERO, [(W(1, -2, 7), 10), (W(5, 0, 7), 30), (W(2, 4, 7), 60)])
    np.testing.assert_allclose(out["w"], [2.8, 2.2, 7.0], rtol=1e-6)
    assert out["w"].dtype == np.float32


def test_fedprox_sends_its_proximal_mu_to_every_hospital():
    strategy = build_strategy(_settings(strategy="fedprox", proximal_mu=0.25))
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(ZERO["w"])}), ConfigRecord(), StandInGrid([1, 2])))
    assert [m.content["config"]["proximal-mu"] for m in msgs] == [0.25, 0.25]


# ------------------------------------------------------------------------------------------------ robust
def test_fedmedian_is_the_coordinate_wise_median_whatever_the_examples():
    # per coordinate over the hospitals: median(1, 3, 2) = 2; median(100, -1, 5) = 5; median(0, 0, 9) = 0.
    # The weighted mean (10/20/970 examples) would be about (2.0, 6.8, 8.7): the claim of examples plays no part.
    strategy = build_strategy(_settings(strategy="fedmedian", nodes=3))
    out = _round(strategy, ZERO, [(W(1, 100, 0), 10), (W(3, -1, 0), 20), (W(2, 5, 9), 970)])
    np.testing.assert_array_equal(out["w"], np.array([2, 5, 0], np.float32))


def test_fedtrimmedavg_drops_the_extremes_of_each_coordinate_and_averages_the_rest():
    # beta 0.2 of 5 replies: int(0.2 x 5) = 1 cut at each end of every coordinate, unweighted mean of the 3 left:
    #   coordinate 0:   1, 2, 3, 4, 100 -> (2 + 3 + 4) / 3 = 3
    #   coordinate 1: -50, 9, 0, 6, 3   -> sorted -50 0 3 6 9 -> (0 + 3 + 6) / 3 = 3
    #   coordinate 2:   5, 5, 5, 5, -5  -> (5 + 5 + 5) / 3 = 5
    strategy = build_strategy(_settings(strategy="fedtrimmedavg", trimmed_beta=0.2, nodes=5))
    replies = [(W(1, -50, 5), 1), (W(2, 9, 5), 1000), (W(3, 0, 5), 1), (W(4, 6, 5), 1), (W(100, 3, -5), 1)]
    out = _round(strategy, ZERO, replies)
    np.testing.assert_allclose(out["w"], [3.0, 3.0, 5.0], rtol=1e-6)


def test_krum_returns_the_one_reply_closest_to_its_neighbours():
    # Replies base + offset (offsets 0, 1, 1.5, 3, 100), krum-malicious-nodes f = 1 of n = 5: each reply's score is
    # its summed squared distance to its n - f - 2 = 2 nearest others (x the 6 coordinates, which orders alike):
    #   0: 1 + 2.25 = 3.25   1: 0.25 + 1 = 1.25   1.5: 0.25 + 2.25 = 2.5   3: 2.25 + 4 = 6.25   100: 97^2 + 98^2
    # so Krum picks offset 1 (the 2nd reply) as it is: neither the mean (offset 21.1) nor the median (1.5).
    base = np.random.default_rng(0).normal(size=6).astype(np.float32)
    offsets = [0.0, 1.0, 1.5, 3.0, 100.0]
    replies = [({"w": base + np.float32(o)}, n) for o, n in zip(offsets, (50, 1, 50, 50, 50), strict=True)]
    strategy = build_strategy(_settings(strategy="krum", krum_malicious_nodes=1, nodes=5))
    out = _round(strategy, {"w": np.zeros(6, np.float32)}, replies)
    np.testing.assert_array_equal(out["w"], replies[1][0]["w"])


# ------------------------------------------------------------------------------------------------ server optimisers
def test_fedavgm_steps_with_server_momentum_over_rounds():
    # server lr 0.5, momentum 0.9, global 0 -> round 1: mean (10 x 2 + 30 x 4) / 40 = 3.5, pseudo-gradient
    # 0 - 3.5 = -3.5 = momentum, global 0 - 0.5 x -3.5 = 1.75. Round 2: mean (10 x 3 + 30 x 5) / 40 = 4.5,
    # pseudo-gradient 1.75 - 4.5 = -2.75, momentum 0.9 x -3.5 - 2.75 = -5.9, global 1.75 + 0.5 x 5.9 = 4.7
    # (without momentum: 3.125; plain FedAvg: 4.5).
    strategy = build_strategy(_settings(strategy="fedavgm", fedavgm_server_lr=0.5, fedavgm_momentum=0.9))
    g1 = _round(strategy, {"w": np.zeros(1, np.float32)}, [(W(2), 10), (W(4), 30)], 1)
    np.testing.assert_allclose(g1["w"], [1.75], rtol=1e-6)
    g2 = _round(strategy, g1, [(W(3), 10), (W(5), 30)], 2)
    np.testing.assert_allclose(g2["w"], [4.7], rtol=1e-6)


def _fedopt_rule(kind: str, s: Settings, means: list[np.ndarray]) -> np.ndarray:
    """Reddi et al. 2021 (Adaptive Federated Optimization) as Flower 1.42 writes it, round t:
    delta = mean - x; m = b1 m + (1 - b1) delta; then
    FedAdam: v = b2 v + (1 - b2) delta^2, x += eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt(v) + tau)
    FedYogi: v = v - (1 - b2) delta^2 sign(v - delta^2), x += eta m / (sqrt(v) + tau)   (no bias correction).
    `means`: each round's example-weighted mean of the replies, as the strategy is given them."""
    b1, b2, eta, tau = s.federation.fedopt_beta_1, s.federation.fedopt_beta_2, s.federation.fedopt_eta, s.federation.fedopt_tau
    x = np.zeros_like(means[0], dtype=np.float64)
    m = v = np.zeros_like(x)
    for t, mean in enumerate(means, start=1):
        delta = mean - x
        m = b1 * m + (1 - b1) * delta
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * delta ** 2
            x = x + eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) * m / (np.sqrt(v) + tau)
        else:
            v = v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2)
            x = x + eta * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_fedadam_and_fedyogi_take_the_adaptive_server_step(kind):
    """Two rounds: the global model moves by the adaptive rule (a step of about the same size in every coordinate,
    whatever the size of the hospitals' change: 3.5 and 0.125 move alike), not to the hospitals' mean."""
    s = _settings(strategy=kind, fedopt_eta=0.05)
    strategy = build_strategy(s)
    rounds = [[(W(2.0, 0.05, -1.0), 10), (W(4.0, 0.15, -1.0), 30)],    # weighted means 3.5, 0.125, -1
              [(W(1.0, 0.0, 2.0), 10), (W(1.0, 0.04, 2.0), 30)]]      # 1, 0.03, 2
    means = [np.array([3.5, 0.125, -1.0]), np.array([1.0, 0.03, 2.0])]
    current = {"w": np.zeros(3, np.float32)}
    for t, replies in enumerate(rounds, start=1):
        current = _round(strategy, current, replies, t)
        np.testing.assert_allclose(current["w"], _fedopt_rule(kind, s, means[:t]), rtol=1e-5, atol=1e-7)
    first = _fedopt_rule(kind, s, means[:1])
    assert np.all(np.abs(first) < 0.06) and 1 < first[0] / first[1] < 1.1   # alike steps, nowhere near the mean
