"""One hospital must not set the global model: the guards (server/guards.py) on hand-made Flower Messages
through GuardedGrid and Flower's real strategies, and what each offered strategy computes.

Each attack test also runs with the guards off and asserts that the attack then succeeds, so the test shows
that the guard, not something else, stops it (NaN is the reply gate's, on either way). The sign flip is
caught by the direction check, which is opt-in (guards.min_cosine; off by default, see server/guards.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.settings import STRATEGIES, Settings
from common.errors import FedxrayError
from tests.conftest import StandInGrid

SHAPES = {"conv.weight": (8, 4, 3, 3), "bn.weight": (8,), "bn.running_mean": (8,), "bn.running_var": (8,),
          "bn.num_batches_tracked": (), "fc.weight": (4, 32), "fc.bias": (4,)}
SIZES = {1: 60, 2: 90, 3: 100, 4: 150, 5: 120}   # num-examples: uneven, within 3 x the median of the others
ATTACKER = 5


@pytest.fixture(autouse=True)
def task_identity():
    """Messages created outside a Flower runtime need a task identity, as run_simulation sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items() if k != "bn.num_batches_tracked"}
    out["bn.running_var"] = np.abs(out["bn.running_var"]) + 0.5
    out["bn.num_batches_tracked"] = np.array(10, np.int64)
    return out


def _honest(glob: dict[str, np.ndarray], node: int, round_: int = 1) -> dict[str, np.ndarray]:
    """Non-IID honest training: a shared direction plus a hospital's own part that is 1.5 x as large, and a
    step that grows with the hospital's size (more local batches)."""
    common = np.random.default_rng(100 + round_)
    own = np.random.default_rng(1000 * round_ + node)
    step = 0.02 * (SIZES[node] / 100) ** 0.5
    out = {}
    for k, g in glob.items():
        if k == "bn.num_batches_tracked":   # a torch model's buffer stays int64 whatever the server sent
            out[k] = np.asarray(np.rint(g) + SIZES[node] // 8, np.int64)
            continue
        shared = common.normal(size=g.shape)
        out[k] = (g + step * (shared + 1.5 * own.normal(size=g.shape))).astype(np.float32)
    return out


ATTACKS = {   # what the attacker (node 5) sends instead of its honest update: (arrays, num-examples)
    "scaled": lambda g, h: ({k: v * 1000 if v.dtype.kind == "f" else v for k, v in h.items()}, SIZES[ATTACKER]),
    "sign-flipped": lambda g, h: ({k: 2 * g[k] - v if v.dtype.kind == "f" else v for k, v in h.items()},
                                  SIZES[ATTACKER]),
    "nan": lambda g, h: ({**h, "fc.weight": np.full_like(h["fc.weight"], np.nan)}, SIZES[ATTACKER]),
    "inflated": lambda g, h: (h, 1e9),
}


class Hospitals(StandInGrid):
    """Hospitals whose train replies are `answer(node, global arrays) -> (arrays, num-examples)`."""

    def __init__(self, answer, nodes=tuple(SIZES)):
        super().__init__(nodes, answer)

    def reply(self, m):
        glob = {k: a.numpy() for k, a in m.content["arrays"].items()}
        arrays, n = self.answer(m.metadata.dst_node_id, glob)
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}), reply_to=m)


def _settings(**kw) -> Settings:
    """Demo settings with federation keys given by their field names (strategy=, min_train_nodes=, ...) and
    guard keys as guard_<name>=."""
    layer = {"federation.min_train_nodes": len(SIZES), "federation.min_available_nodes": len(SIZES)}
    for k, v in kw.items():
        layer[f"guards.{k.removeprefix('guard_')}" if k.startswith("guard_") else f"federation.{k}"] = v
    return Settings.build("demo", layer)


def _round(answer, guards=None, strategy="fedavg", glob=None, grid=None, nodes=tuple(SIZES), **kw):
    """One train round: Flower's configure_train -> GuardedGrid (reply gate + guards) -> aggregate_train.
    Returns (aggregated arrays, history rows by node id, the grid)."""
    from server.grid import GuardedGrid
    from server.guards import ReplyGuards
    from server.strategies import build_strategy

    glob = _global() if glob is None else glob
    s = _settings(strategy=strategy, min_train_nodes=len(nodes), min_available_nodes=len(nodes), **kw)
    grid = grid or GuardedGrid(Hospitals(answer, nodes), min_nodes=1, wait_timeout=5, guards=ReplyGuards(guards))
    strategy = build_strategy(s)
    msgs = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in glob.items()}), ConfigRecord(), grid))
    kept = grid.send_and_receive(msgs, timeout=5)
    arrays, _ = strategy.aggregate_train(1, kept)
    rows = {r["node_id"]: r for r in grid.drain()[0]}
    return ({k: v.numpy() for k, v in arrays.items()} if arrays is not None else None), rows, grid


def _fedavg(updates: dict[int, dict], sizes: dict[int, float]) -> dict[str, np.ndarray]:
    total = sum(sizes[n] for n in updates)
    return {k: sum(sizes[n] / total * updates[n][k].astype(np.float64) for n in updates) for k in SHAPES}


def _moved(agg, ref, glob) -> float:
    """How far the aggregate is from `ref`, relative to how far `ref` moved from the global model."""
    keys = [k for k in SHAPES if glob[k].dtype.kind == "f"]
    diff = np.concatenate([(agg[k] - ref[k]).ravel() for k in keys])
    step = np.concatenate([(ref[k] - glob[k]).ravel() for k in keys])
    return float(np.linalg.norm(diff) / np.linalg.norm(step))


# ------------------------------------------------------------------------------------------------ attacks
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_one_hostile_hospital_is_excluded_or_capped_by_default_and_wins_without_the_guards(attack):
    from dataclasses import replace

    from server.grid import REJECTED
    from server.guards import DEFAULTS, OFF

    guards = DEFAULTS.model_copy(update={"min_cosine": 0.0}) if attack == "sign-flipped" else DEFAULTS

    glob = _global()
    honest = {n: _honest(glob, n) for n in SIZES}
    sent = {n: (honest[n], SIZES[n]) for n in SIZES}
    sent[ATTACKER] = ATTACKS[attack](glob, honest[ATTACKER])
    answer = lambda node, g: sent[node]  # noqa: E731
    without = {n: honest[n] for n in SIZES if n != ATTACKER}

    agg, rows, _ = _round(answer, guards)
    assert all(rows[n]["ok"] for n in without), {n: rows[n].get("error") for n in without}
    if attack == "inflated":   # kept, with a bounded weight: 3 x the median of the other hospitals' claims
        cap = 3 * np.median([SIZES[n] for n in without])
        assert rows[ATTACKER]["ok"] and rows[ATTACKER]["metrics"]["num-examples"] == cap
        assert "capped to 285: 3 x the median 95 of the other hospitals' claims (guards.examples_ratio)" \
            in rows[ATTACKER]["guard"]["capped"]
        assert cap / (cap + sum(SIZES[n] for n in without)) < 0.5
        expected = _fedavg(honest, {**SIZES, ATTACKER: cap})
    else:
        reason = {"scaled": "x the round's median size", "sign-flipped": "points away from the other hospitals'",
                  "nan": "NaN/inf"}[attack]
        assert not rows[ATTACKER]["ok"] and rows[ATTACKER]["error"].startswith(REJECTED), rows[ATTACKER]
        assert reason in rows[ATTACKER]["error"], rows[ATTACKER]["error"]
        expected = _fedavg(without, SIZES)
    for k in SHAPES:
        np.testing.assert_allclose(agg[k], expected[k], rtol=1e-5, atol=1e-6 if k != "bn.num_batches_tracked" else 1)

    agg_off, rows_off, _ = _round(answer, OFF)
    if attack == "nan":   # the reply gate (server/grid.py), not a guard: on either way
        assert not rows_off[ATTACKER]["ok"] and "NaN/inf" in rows_off[ATTACKER]["error"]
        return
    assert rows_off[ATTACKER]["ok"] and "guard" not in rows_off[ATTACKER]
    if attack == "inflated":   # without the cap the attacker's weights ARE the global model
        assert _moved(agg_off, honest[ATTACKER], glob) < 1e-5
    else:                      # the model lands far off what the honest hospitals agree on
        assert _moved(agg_off, _fedavg(without, SIZES), glob) > {"scaled": 100, "sign-flipped": 0.3}[attack]
        assert _moved(agg, _fedavg(without, SIZES), glob) < 1e-5


def test_an_honest_hospital_that_pulls_the_other_way_is_kept_by_default():
    """Skewed labels (one hospital holds most of the minority class) make an honest update point away from
    the others' (cosines down to -0.43 measured, Dirichlet 0.3): why the direction check is opt-in."""
    from dataclasses import replace

    from server.guards import DEFAULTS

    glob = _global()
    honest = {n: _honest(glob, n) for n in SIZES}
    honest[3] = {k: 2 * glob[k] - v * 0.5 - glob[k] * 0.5 if v.dtype.kind == "f" else v for k, v in honest[3].items()}
    answer = lambda node, g: (honest[node], SIZES[node])  # noqa: E731
    _, rows, _ = _round(answer, DEFAULTS)
    assert all(r["ok"] for r in rows.values()) and rows[3]["guard"]["update-cosine"] < 0
    _, rows, _ = _round(answer, DEFAULTS.model_copy(update={"min_cosine": 0.0}))
    assert not rows[3]["ok"] and "points away" in rows[3]["error"]


def test_honest_uneven_non_iid_hospitals_pass_every_guard_over_several_rounds():
    from server.grid import GuardedGrid
    from server.guards import DEFAULTS, ReplyGuards

    grid = GuardedGrid(Hospitals(lambda n, g: None), min_nodes=1, wait_timeout=5, guards=ReplyGuards(DEFAULTS))
    glob = _global()
    for r in range(1, 6):
        grid._grid.answer = lambda n, g, r=r: (_honest(g, n, r), SIZES[n])
        agg, rows, _ = _round(None, grid=grid, glob=glob)
        assert all(row["ok"] and "capped" not in row.get("guard", {}) for row in rows.values()), rows
        assert all(0 < row["guard"]["update-cosine"] and row["guard"]["update-norm-ratio"] < 2 for row in rows.values())
        glob = {k: v.astype(glob[k].dtype) for k, v in agg.items()}


def test_a_claim_cannot_grow_past_the_hospitals_first_accepted_one():
    from server.grid import GuardedGrid
    from server.guards import DEFAULTS, ReplyGuards

    claims = {1: dict(SIZES), 2: {**SIZES, 3: 250}}   # round 2: node 3 claims 2.5 x (within 3 x the median)
    grid = GuardedGrid(Hospitals(None), min_nodes=1, wait_timeout=5, guards=ReplyGuards(DEFAULTS))
    for r in (1, 2):
        grid._grid.answer = lambda n, g, r=r: (_honest(g, n, r), claims[r][n])
        _, rows, _ = _round(None, grid=grid)
    assert rows[3]["ok"] and rows[3]["metrics"]["num-examples"] == SIZES[3]
    assert "first accepted claim 100 (guards.examples_growth)" in rows[3]["guard"]["capped"]
    assert all(rows[n]["metrics"]["num-examples"] == SIZES[n] for n in SIZES if n != 3)


def test_with_two_hospitals_each_claim_is_bounded_by_the_other_and_update_checks_are_skipped(caplog):
    from server.guards import DEFAULTS

    glob = _global()
    sent = {1: (_honest(glob, 1), 100), 2: (ATTACKS["scaled"](glob, _honest(glob, 2))[0], 1e9)}
    with caplog.at_level("WARNING"):
        _, rows, _ = _round(lambda n, g: sent[n], DEFAULTS, nodes=(1, 2))
    assert rows[1]["ok"] and rows[2]["ok"]                              # a median of 2 says nothing
    assert rows[2]["metrics"]["num-examples"] == 300                    # but the weight stays bounded
    assert "update-norm-ratio" not in rows[2]["guard"] and "skipped" in caplog.text


def test_update_scores_are_the_plain_formulas_whatever_the_chunking(monkeypatch):
    import server.guards as guards

    rng = np.random.default_rng(3)
    glob = {"a": rng.normal(size=(50, 7)).astype(np.float32), "i": np.array(3, np.int64)}
    ups = [{"a": glob["a"] + rng.normal(size=(50, 7)).astype(np.float32) * s, "i": np.array(9, np.int64)}
           for s in (0.5, 1.0, 2.0, 8.0)]
    d = np.stack([u["a"].astype(np.float64).ravel() - glob["a"].ravel() for u in ups])
    norms, med = np.linalg.norm(d, axis=1), np.median(d, axis=0)
    monkeypatch.setattr(guards, "CHUNK", 16)   # slices that do not divide the array
    scores = guards.update_scores(ups, glob)
    np.testing.assert_allclose([s.norm for s in scores], norms, rtol=1e-9)
    np.testing.assert_allclose([s.norm_ratio for s in scores], norms / np.median(norms), rtol=1e-9)
    np.testing.assert_allclose([s.cosine for s in scores], d @ med / (norms * np.linalg.norm(med)), rtol=1e-9)
    assert [s.norm_ratio for s in guards.update_scores(ups[:2], glob)] == [None, None]


# ------------------------------------------------------------------------------------------------ strategies
def _expected(name: str, ups: dict[int, dict], sizes: dict[int, float]) -> dict[str, np.ndarray] | None:
    stack = {k: np.stack([ups[n][k].astype(np.float64) for n in sorted(ups)]) for k in SHAPES}
    if name in ("fedavg", "fedprox"):
        return _fedavg(ups, sizes)
    if name == "fedmedian":
        return {k: np.median(v, axis=0) for k, v in stack.items()}
    if name == "fedtrimmedavg":   # beta 0.2 of 5: the lowest and the highest value of each coordinate cut
        return {k: np.sort(v, axis=0)[1:-1].mean(axis=0) for k, v in stack.items()}
    if name == "krum":   # Blanchard et al.: the update with the least sum of squared distances to its n - f - 2
        flat = [np.concatenate([ups[n][k].astype(np.float64).ravel() for k in SHAPES]) for n in sorted(ups)]
        dist = np.array([[np.sum((a - b) ** 2) for b in flat] for a in flat])
        score = [np.sort(row)[1:1 + len(flat) - 1 - 2].sum() for row in dist]
        return ups[sorted(ups)[int(np.argmin(score))]]
    return None


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_offered_strategy_computes_what_it_is_named_for_round_after_round(name):
    """Two rounds through GuardedGrid with the guards on. Round 2 is the regression: FedMedian/FedTrimmedAvg
    `pop` the replies' arrays, and read afterwards num_batches_tracked came back float64, so every hospital's
    int64 reply in round 2 was rejected and the strategy got nothing to aggregate."""
    from server.grid import GuardedGrid
    from server.guards import DEFAULTS, ReplyGuards

    kw = {"krum_malicious_nodes": 1} if name == "krum" else {}
    grid = GuardedGrid(Hospitals(None), min_nodes=1, wait_timeout=5, guards=ReplyGuards(DEFAULTS))
    glob = _global()
    for r in (1, 2):
        ups = {n: _honest(glob, n, r) for n in SIZES}
        grid._grid.answer = lambda n, g, ups=ups: (ups[n], SIZES[n])
        agg, rows, _ = _round(None, strategy=name, grid=grid, glob=glob, **kw)
        assert agg is not None and all(row["ok"] for row in rows.values()), (r, rows)
        assert {k: (v.dtype, v.shape) for k, v in agg.items()} == {k: (v.dtype, v.shape) for k, v in glob.items()}
        expected = _expected(name, ups, SIZES)
        if expected is not None:
            for k in SHAPES:
                want = np.rint(expected[k]) if glob[k].dtype.kind == "i" else expected[k]
                np.testing.assert_allclose(agg[k], want, rtol=1e-5, atol=1e-7, err_msg=f"{name} round {r} {k}")
            if name == "krum":
                assert any(all(np.array_equal(agg[k], ups[n][k]) for k in SHAPES) for n in ups)   # one input, as is
        else:   # server optimisers: Flower's own step (tests/test_federated.py); here it goes the mean's way
            mean = _fedavg(ups, SIZES)
            step = sum(float(np.sum((agg[k] - glob[k]) * (mean[k] - glob[k])))
                       for k in SHAPES if glob[k].dtype.kind == "f" and not k.startswith("bn.running"))
            assert step > 0, name
        glob = agg


@pytest.mark.parametrize("strategy, keys, fix", [
    ({"federation.strategy": "krum", "federation.min_train_nodes": 2}, "federation.min_train_nodes=2",
     "at least 3 hospitals"),
    ({"federation.strategy": "krum", "federation.min_train_nodes": 4, "federation.krum_malicious_nodes": 1},
     "federation.krum_malicious_nodes", "at least 5"),
    ({"federation.strategy": "fedtrimmedavg", "federation.min_train_nodes": 3}, "int(0.2 x n)", "at least 5 hospitals"),
    ({"federation.strategy": "fedmedian", "federation.min_train_nodes": 2}, "median of 2 replies is their mean",
     "at least 3"),
    ({"guards.norm_ratio": 0.5}, "guards.norm_ratio", "0 (off) or at least 1"),
])
def test_settings_a_strategy_cannot_honour_are_refused_at_start_naming_the_keys(strategy, keys, fix):
    with pytest.raises(FedxrayError) as e:
        Settings.from_run_config(strategy)
    assert keys in str(e.value) and fix in str(e.value) and "Value error" not in str(e.value), str(e.value)


def test_the_fewest_hospitals_each_robust_strategy_accepts():
    assert Settings.build("demo", {"federation.strategy": "krum", "federation.min_train_nodes": 3}).federation.replies_needed[0] == 3
    assert Settings.build("demo", {"federation.strategy": "krum", "federation.min_train_nodes": 5, "federation.krum_malicious_nodes": 1}).federation.replies_needed[0] == 5
    assert Settings.build("demo", {"federation.strategy": "fedtrimmedavg", "federation.min_train_nodes": 5}).federation.replies_needed[0] == 5
    assert Settings.build("demo", {"federation.strategy": "fedtrimmedavg", "federation.min_train_nodes": 4, "federation.trimmed_beta": 0.25}).federation.replies_needed[0] == 4
    assert Settings.build("demo", {"federation.strategy": "fedmedian", "federation.min_train_nodes": 3}).federation.replies_needed[0] == 3
    assert Settings().federation.replies_needed[0] == 1
