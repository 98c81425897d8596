"""Client-side DP: noise calibrated to a target epsilon, accounting carried across rounds, budget refusal."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import PrivacyBudget, unwrap
from common.config import ModelConfig, PrivacyConfig
from common.models import build_model
from common.training import MaskedBCELoss, train_epoch


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
        engine, m, o, loader = b.attach(model, opt, DataLoader(ds, batch_size=batch))
        train_epoch(m, loader, o, MaskedBCELoss())
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
