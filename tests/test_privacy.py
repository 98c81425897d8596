"""Client-side DP: noise calibrated to a target epsilon, accounting carried across rounds, budget refusal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import PrivacyBudget, unwrap
from common.settings import ModelConfig, PrivacyConfig
from common.models import build_model
from common.training import MaskedBCELoss, train_epoch
from tests.run_support import TINY


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x.mean((1, 2, 3)) > 0).float()[:, None]
    return TensorDataset(x, y, torch.ones(n, 1, dtype=torch.bool))


def test_dp_rounds_spend_about_the_target_and_then_decline():
    ds = _data()
    rounds, epochs, batch = 3, 1, 16
    steps = PrivacyBudget.steps_per_epoch(len(ds), batch) * epochs
    budget = PrivacyBudget(PrivacyConfig(enabled=True, target_epsilon=3.0, delta=1e-5), len(ds), batch, rounds * steps)
    weights, state = build_model(ModelConfig(arch="smallcnn", weights="none", dp_compatible=True), 1).state_dict(), None
    for r in range(rounds):
        model = build_model(ModelConfig(arch="smallcnn", weights="none", dp_compatible=True), 1)
        model.load_state_dict(weights)    # as a client does with the global weights of each round
        b = PrivacyBudget(budget.cfg, len(ds), batch, rounds * steps)
        if state:
            b.load_state(state)          # a fresh process each round: only plain numbers carry over
        assert b.allows(steps)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        engine, m, o, loader, crit = b.attach(model, opt, DataLoader(ds, batch_size=batch), MaskedBCELoss())
        train_epoch(m, loader, o, crit)
        eps = b.record(engine)
        state = b.state()
        weights = {k: v.detach().clone() for k, v in unwrap(m).state_dict().items()}
        assert any(not torch.equal(a, p) for a, p in zip(before, unwrap(m).parameters()))
        assert all(torch.isfinite(v).all() for v in weights.values())
    assert 2.0 < eps <= 3.0 * 1.05, eps      # the planned training spends (about) the target
    final = PrivacyBudget(budget.cfg, len(ds), batch, rounds * steps)
    final.load_state(state)
    assert not final.allows(steps)            # a 4th round would break the budget: the client declines
    assert final.epsilon() == eps


def test_fixed_noise_multiplier_and_default_delta():
    b = PrivacyBudget(PrivacyConfig(enabled=True, noise_multiplier=1.1), 1000, 50, 100)
    assert b.noise_multiplier == 1.1 and b.delta == 1e-4 and b.allows(10_000)
    assert b.epsilon(100) > b.epsilon(10) > 0 == b.epsilon()


# ------------------------------------------------------------------------------------------ in the ClientApp



def _train_msg(model, server_round: int):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from common.arrays import state_to_record

    return Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord(
        {"server-round": server_round, "findings": ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]})}),
        dst_node_id=3, message_type=MessageType.TRAIN)


def test_client_reports_epsilon_each_round_then_declines_and_server_records_it(synth_root, task_identity):
    """Two planned rounds at epsilon 3: both report epsilon (carried in Context.state), a third declines with an
    Error the server recognises; a fresh Context in round 3 (a resumed run) assumes the planned spend."""
    from flwr.app import Context, RecordDict

    from client.app import train
    from client.boundary import is_decline, parse_reply_error
    from client.privacy import DP_STATE
    from common.settings import Settings
    from server.privacy import provenance, record_round

    s = Settings.build("demo", {"data.path": str(synth_root), "privacy.enabled": True, "privacy.target_epsilon": 3.0, "privacy.delta": 1e-5, "federation.rounds": 2, **TINY})
    model = build_model(s.network.model_copy(update={"weights": "none"}), 4, 1)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())   # the Opacus-safe variant
    ctx = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config=s.to_run_config())
    eps, nodes = [], {}
    for r in (1, 2):
        reply = train(_train_msg(model, r), ctx)
        m = reply.content["metrics"]
        assert m["dp-delta"] == 1e-5 and m["dp-assumed-rounds"] == 0 and DP_STATE in ctx.state.config_records
        eps.append(m["dp-epsilon"])
        row = {"type": "train", "ok": True, "node_id": 3, "site": "hospital_1", "metrics": dict(m)}
        record_round(nodes, [row], r)
    assert 0 < eps[0] < eps[1] <= 3.0 * 1.02, eps
    third = train(_train_msg(model, 3), ctx)
    assert third.has_error() and is_decline(third.error.reason)
    failure = parse_reply_error(third.error.reason)
    info = {"site": failure["site"], **failure["detail"]}
    assert info["site"] == "hospital_1" and info["dp-epsilon"] == pytest.approx(eps[1])
    assert info["projected-epsilon"] > 3.0 * 1.02
    record_round(nodes, [{"type": "train", "ok": False, "node_id": 3, "failure": parse_reply_error(third.error.reason)}],
                 3)
    dp = provenance(s, nodes)["client_dp_sgd"]["per_hospital"]["hospital_1"]
    assert dp["epsilon"] == pytest.approx(eps[1]) and dp["delta"] == 1e-5 and dp["declined_rounds"] == [3]
    assert nodes["hospital_1"]["dp"]["epsilon_by_round"] == {"1": eps[0], "2": eps[1], "3": eps[1]}

    fresh = Context(run_id=8, node_id=3, node_config=ctx.node_config, state=RecordDict(), run_config=ctx.run_config)
    resumed = train(_train_msg(model, 3), fresh)   # a resumed run: no history, but 2 rounds already spent
    assert resumed.has_error() and parse_reply_error(resumed.error.reason)["detail"]["dp-assumed-rounds"] == 2


def test_dp_settings_are_validated():
    from common.errors import FedxrayError
    from common.settings import Settings

    with pytest.raises(FedxrayError, match="privacy.enabled needs privacy.target_epsilon or privacy.noise_multiplier"):
        Settings.from_run_config({"privacy.enabled": True, "privacy.target_epsilon": ""})
    with pytest.raises(FedxrayError, match="proximal term"):
        Settings.from_run_config({"privacy.enabled": True, "federation.strategy": "fedprox", "federation.proximal_mu": 0.1})
    with pytest.raises(FedxrayError, match="SecAgg"):
        Settings.from_run_config({"secagg.enabled": True, "federation.strategy": "fedprox"})
    assert Settings.build("demo", {"privacy.enabled": True}).network.dp_compatible


# ------------------------------------------------------------------------------------------ on the server
def _reply(instruction, arrays: dict, n: int, **metrics):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, **metrics})})
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"])
def test_central_dp_wraps_flowers_strategy_and_survives_a_declined_hospital(mode, task_identity):
    """Flower's DifferentialPrivacy* wrapper around FedAvg; a declining hospital's Error reply is recorded by
    GuardedGrid but not handed to the wrapper (which would skip the whole round on any error)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
    from flwr.serverapp import strategy as fs
    from flwr.supercore.differential_privacy import KEY_NORM_BIT

    from client.boundary import REFUSED, reason
    from common.settings import Settings
    from server.grid import GuardedGrid
    from server.privacy import wrap_central_dp
    from tests.conftest import StandInGrid
    from server.strategies import build_strategy

    s = Settings.build("demo", {"central_dp.mode": mode, "central_dp.noise_multiplier": 0.0, "central_dp.clipping_norm": 0.5, "federation.min_train_nodes": 2, "federation.min_available_nodes": 2})
    strategy = wrap_central_dp(build_strategy(s), s)
    cls = {"server-fixed": fs.DifferentialPrivacyServerSideFixedClipping,
           "client-fixed": fs.DifferentialPrivacyClientSideFixedClipping,
           "server-adaptive": fs.DifferentialPrivacyServerSideAdaptiveClipping,
           "client-adaptive": fs.DifferentialPrivacyClientSideAdaptiveClipping}[mode]
    assert type(strategy) is cls and isinstance(strategy.strategy, fs.FedAvg)

    def answer(m):
        node = m.metadata.dst_node_id
        if node == 3:
            return Message(Error(REFUSED, reason("dp-budget-spent", site="h3", detail={
                "dp-epsilon": 3.0, "dp-delta": 1e-05})), reply_to=m)
        metrics = {KEY_NORM_BIT: 1} if mode == "client-adaptive" else {}  # adaptiveclipping_mod's
        return _reply(m, {"w": np.full(4, 3.0 * node, np.float32)}, 10, **metrics)

    grid = GuardedGrid(StandInGrid([1, 2, 3], answer), min_nodes=2, wait_timeout=5)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord(), grid))
    assert len(msgs) == 3
    replies = list(grid.send_and_receive(msgs, timeout=5))
    assert len(replies) == 2 and len(grid.replies) == 3      # the decline is recorded, not aggregated
    arrays, _ = strategy.aggregate_train(1, replies)
    # updates 3 x (1, 1, 1, 1) and 6 x (1, 1, 1, 1), 10 examples each: clipped on the server to norm 0.5, i.e.
    # 0.25 each; the client-side modes leave clipping to the hospitals' mod (not in this test): the plain mean 4.5
    expected = 0.25 if mode.startswith("server") else 4.5
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, expected), rtol=1e-6)


def _central_round(mode: str, noise: float, clip: float, current: np.ndarray, updates, examples, seed: int = 0):
    """One round of Flower's central-DP wrapper (as wrap_central_dp builds it) around our FedAvg: the hospitals
    reply current + update; in the client-side modes each reply goes through the ClientApp's own mods (Flower's
    fixedclipping_mod / adaptiveclipping_mod), as on a SuperNode. Returns the new global array."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from client.mods import make_mods
    from common.settings import Settings
    from server.privacy import wrap_central_dp
    from server.strategies import build_strategy
    from tests.conftest import StandInGrid

    n = len(updates)
    s = Settings.build("demo", {"central_dp": {"mode": mode, "noise_multiplier": noise, "clipping_norm": clip},
                                "federation": {"min_train_nodes": n, "min_available_nodes": n}})
    strategy = wrap_central_dp(build_strategy(s), s)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(current.astype(np.float32))}), ConfigRecord(),
                                         StandInGrid(list(range(1, n + 1)))))
    central = next(m for m in make_mods({"central_dp.mode": mode}) if m.__name__ == "central_dp")
    ctx = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    replies = []
    for m, u, k in zip(msgs, updates, examples, strict=True):
        answer = lambda msg, _c, u=u, k=k: _reply(msg, {"w": (current + u).astype(np.float32)}, k)  # noqa: E731
        replies.append(central(m, ctx, answer) if mode.startswith("client") else answer(m, ctx))
    np.random.seed(seed)   # Flower draws the noise from NumPy's global generator
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy().astype(np.float64)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"])
def test_central_dp_without_noise_is_exactly_the_clipped_weighted_mean(mode, task_identity):
    """sigma = 0: every hospital's update (reply - global) is scaled to norm <= C, then FedAvg's example-weighted
    mean, and nothing else. Hand-computed with C = 1 around a global of ones:
      (3, 4, 0, 0)   norm 5   -> (0.6, 0.8, 0, 0)   x 10 examples
      (0, 0, .3, .4) norm 0.5 -> unchanged          x 30
      (0, 0, 0, -10) norm 10  -> (0, 0, 0, -1)      x 60
      mean = (0.06, 0.08, 0.09, (30 x 0.4 - 60) / 100 = -0.48), + the global 1."""
    import numpy as np

    updates = [np.array([3.0, 4, 0, 0]), np.array([0, 0, 0.3, 0.4]), np.array([0, 0, 0, -10.0])]
    out = _central_round(mode, 0.0, 1.0, np.ones(4), updates, [10, 30, 60])
    np.testing.assert_allclose(out, 1 + np.array([0.06, 0.08, 0.09, -0.48]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_central_dp_noise_has_the_spread_sigma_c_over_n(mode, task_identity):
    """sigma = 1.5, C = 0.5, 3 hospitals sampled: Gaussian noise of std sigma x C / n = 0.25 on every coordinate
    of the clipped mean. Measured as the difference to the same round without noise, over 30 000 coordinates:
    the sample std is within 1/sqrt(2 x 30 000) = 0.4% of the true one, so 5% can only fail when the
    calibration is wrong (std sigma x C, or / sqrt(n), or the unclipped norm would be 2x off or more)."""
    import numpy as np

    rng = np.random.default_rng(3)
    d = 30_000
    current = rng.normal(size=d)
    updates = [rng.normal(size=d) * scale for scale in (0.001, 0.05, 1.0)]   # norms ~0.17, 8.7, 173: two clipped
    examples = [10, 20, 30]
    noisy = _central_round(mode, 1.5, 0.5, current, updates, examples, seed=1)
    clean = _central_round(mode, 0.0, 0.5, current, updates, examples)
    noise = noisy - clean
    std = 1.5 * 0.5 / 3
    assert noise.std() == pytest.approx(std, rel=0.05)
    assert abs(noise.mean()) < 5 * std / np.sqrt(d)
    assert np.linalg.norm(clean - current) <= 0.5 + 1e-4      # the noiseless step is the clipped one


def test_client_side_clipping_mod_clips_the_update(task_identity):
    """With a client-side mode the ClientApp's mods apply Flower's fixedclipping_mod to the reply."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from client.mods import make_mods

    def mod(name, overrides=None):
        return next(m for m in make_mods(overrides) if m.__name__ == name)

    central = mod("central_dp", {"central_dp.mode": "client-fixed"})
    msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                              "config": ConfigRecord({KEY_CLIPPING_NORM: 0.5})}), dst_node_id=3,
                  message_type=MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    out = central(msg, ctx, lambda m, c: _reply(m, {"w": np.full(4, 10.0, np.float32)}, 5))
    assert np.linalg.norm(out.content["arrays"]["w"].numpy()) == pytest.approx(0.5, rel=1e-5)
    plain = mod("central_dp")(Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=3,
                                   message_type=MessageType.TRAIN), ctx, lambda m, c: "untouched")
    assert plain == "untouched"


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.integration
def test_federated_run_with_dp_sgd_and_central_dp_records_epsilon_per_hospital(synth_root, tmp_path):
    """`fedxray federate` (simulation runtime, 3 hospitals, 2 rounds) with DP-SGD at epsilon 5 in every
    hospital and Flower's client-side fixed-clipping central DP around FedAvg: epsilon per hospital per round in
    the history, final (epsilon, delta) per hospital in the bundle's provenance, the GroupNorm model in the bundle."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from common.bundle import load_bundle
    from server.launch import flower_env
    from server.processes import stop_tree
    from tests.conftest import REPO

    out, ray_tmp = tmp_path / "out", Path("/tmp") / f"raydp{os.getpid()}"
    sets = {**TINY, "privacy.enabled": True, "privacy.target_epsilon": 5.0, "central_dp.mode": "client-fixed",
            "central_dp.noise_multiplier": 0.01, "central_dp.clipping_norm": 10.0, "federation.min_train_nodes": 3,
            "federation.node_wait_timeout": 60.0, "federation.round_timeout": 300.0}
    cmd = [sys.executable, "-m", "fedxray", "federate", "--profile", "demo", "--data", str(synth_root), "--out", str(out),
           "--supernodes", "3", "--rounds", "2", *[f"--set={k}={json.dumps(v)}" for k, v in sets.items()]]
    p = subprocess.Popen(cmd, cwd=REPO, env=flower_env(tmp_path / "home", ray_tmp), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=600)
    finally:
        stop_tree(p.pid, grace=5)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, log[-3000:]
    assert "central DP noise with" in log and "fixedclipping_mod" in log
    summary = json.loads((out / "federation.json").read_text())
    per_round = [h["privacy"] for h in summary["history"][1:]]
    assert [set(r) for r in per_round] == [{"hospital_1", "hospital_2", "hospital_3"}] * 2
    for site in per_round[0]:
        assert 0 < per_round[0][site]["epsilon"] < per_round[1][site]["epsilon"] <= 5.0 * 1.02
    card = load_bundle(out / "bundle").card
    fed = card["provenance"]["federation"]
    per = fed["dp"]["client_dp_sgd"]["per_hospital"]
    assert set(per) == {"hospital_1", "hospital_2", "hospital_3"}
    assert all(0 < v["epsilon"] <= 5.1 and 0 < v["delta"] < 1e-2 for v in per.values())
    assert fed["epsilon"] == max(v["epsilon"] for v in per.values())
    assert fed["dp"]["central"]["mode"] == "client-fixed" and card["architecture"]["dp_compatible"] is True


def test_dp_noise_and_sampling_are_not_reproducible_from_the_run_seed_by_default():
    """The run's seed is in the run config (which the server writes): with the default secure RNG the Poisson
    batches and the noise come from a generator seeded by the OS CSPRNG, and Opacus' floating-point-safe noise
    is on; with privacy.secure_rng=false (experiments) the same seed gives the same batches."""
    ds = _data(256)

    def batches(secure: bool):
        torch.manual_seed(0)
        b = PrivacyBudget(PrivacyConfig(enabled=True, noise_multiplier=1.0, secure_rng=secure), len(ds), 16, 16)
        model = build_model(ModelConfig(arch="smallcnn", weights="none", dp_compatible=True), 1)
        _, _, opt, loader, _ = b.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                        DataLoader(ds, batch_size=16, drop_last=True), MaskedBCELoss())
        return opt, [len(x) for x, *_ in loader]

    opt, first = batches(True)
    assert opt.secure_mode and opt.generator is not None
    assert first != batches(True)[1]                         # same torch seed, other batches
    opt, plain = batches(False)
    assert not opt.secure_mode and plain == batches(False)[1]


# ------------------------------------------------------------------------------------------ what DP-SGD trains
def test_privacy_trainable_auto_is_norm_layers_and_head_when_pretrained_and_everything_from_scratch():
    from client.privacy import dp_trainable, is_pretrained
    from common.models import set_trainable

    auto = PrivacyConfig()
    assert auto.trainable == "auto"
    assert dp_trainable(auto, is_pretrained("imagenet")) == dp_trainable(auto, is_pretrained("/w.safetensors")) == "norm+head"
    assert dp_trainable(auto, is_pretrained("none")) == "all"
    assert dp_trainable(PrivacyConfig(trainable="last-block+head"), False) == "last-block+head"
    model = build_model(ModelConfig(arch="resnet18", weights="none", dp_compatible=True), 3)
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm) for p in ("weight", "bias")}
    assert len(norms) == 2 * 20                    # every GroupNorm of ResNet-18 (BatchNorms swapped by Opacus)
    assert set(set_trainable(model, "norm+head")) == norms | {"fc.weight", "fc.bias"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".conv" in n or n == "conv1.weight")
    last = set(set_trainable(model, "last-block+head"))
    assert last == {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    assert len(set_trainable(model, "all")) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_round_of_a_warm_started_model_trains_only_norms_and_head_within_the_budget(mode, synth_root, tmp_path,
                                                                                      task_identity):
    """The ClientApp with privacy on and a pretrained start (a weights file): the reply changes the normalisation
    layers and the head only, and the epsilon it reports stays within the target (Opacus' accountant)."""
    from flwr.app import Context, RecordDict
    from safetensors.torch import save_file

    from client.app import train
    from common.settings import Settings

    warm = tmp_path / "warm.safetensors"
    s = Settings.build("demo", {"data.path": str(synth_root), "privacy.enabled": True, "privacy.target_epsilon": 3.0,
                                "privacy.grad_sample_mode": mode, "model.weights": str(warm), "federation.rounds": 2,
                                **TINY})
    model = build_model(s.network.model_copy(update={"weights": "none"}), 4, 1)
    save_file(model.state_dict(), str(warm))     # what the server starts from; the client gets it as the round's weights
    ctx = Context(run_id=9, node_id=3, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                  run_config=s.to_run_config())
    reply = train(_train_msg(model, 1), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content["metrics"]
    assert 0 < m["dp-epsilon"] <= 3.0 * 1.02
    sent = model.state_dict()
    got = {k: torch.from_numpy(np.array(a.numpy())) for k, a in reply.content["arrays"].items()}
    norms = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.GroupNorm)}
    changed = {k for k in sent if not torch.equal(sent[k], got[k])}
    trainable = {k for k in sent if k.rsplit(".", 1)[0] in norms or k.startswith("fc.")}
    assert changed <= trainable, changed - trainable
    assert any(k.rsplit(".", 1)[0] in norms for k in changed) and any(k.startswith("fc.") for k in changed)
    assert all(torch.equal(sent[k], got[k]) for k in sent if k not in trainable)   # every conv exactly as sent


@pytest.mark.parametrize("shape", [(3, 8, 3, 1, 1, 8, True), (4, 6, 7, 2, 3, 16, False), (64, 64, 3, 1, 1, 1, False)])
def test_conv_ghost_norms_equal_the_norms_of_per_sample_gradients(shape):
    """Ghost clipping's Conv2d norm sampler (client.privacy.conv2d_norm_sample) against per-sample gradients
    computed one sample at a time by autograd; the shapes take both branches (A A^T . G G^T and G^T A)."""
    from client.privacy import conv2d_norm_sample

    cin, cout, k, stride, pad, hw, bias = shape
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)
    x = torch.randn(4, cin, hw, hw)
    ref = []
    for i in range(len(x)):
        layer.zero_grad()
        layer(x[i:i + 1]).pow(2).sum().backward()
        ref.append(torch.cat([p.grad.flatten() for p in layer.parameters()]).norm())
    norms = conv2d_norm_sample(layer, [x], 2 * layer(x).detach())   # d(sum y^2)/dy = 2y per sample
    assert set(norms) == set(layer.parameters())
    got = torch.stack(list(norms.values())).pow(2).sum(0).sqrt()
    assert torch.allclose(got, torch.stack(ref), rtol=1e-4), (got, ref)
