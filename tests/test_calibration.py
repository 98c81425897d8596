"""Calibration of the exported model (common/calibration.py): the fits recover a known miscalibration, and the
folded head gives exactly the calibrated logits with the ranking unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.calibration import calibrate, fit_calibration, fold_calibration, logits_of, nll
from common.models import SmallCNN


def _miscalibrated(n: int = 20000, seed: int = 0):
    """True logits z, labels drawn from sigmoid(z), and the logits a biased, over-confident model gives: 3 z + 4
    (the label-skew failure: every probability pushed towards 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 1))
    y = (rng.random((n, 1)) < 1 / (1 + np.exp(-z))).astype(np.float64)
    return 3 * z + 4, y, np.ones_like(y, bool)


def test_platt_recovers_the_scale_and_shift_that_miscalibrated_the_logits():
    observed, y, m = _miscalibrated()
    method, a, b = fit_calibration(observed, y, m, multilabel=True, method="platt")
    assert method == "platt"
    assert a[0] == pytest.approx(1 / 3, rel=0.05) and b[0] == pytest.approx(-4 / 3, rel=0.05)
    assert nll(observed[:, 0] * a[0] + b[0], y[:, 0], True) < nll(observed[:, 0], y[:, 0], True)


def test_temperature_scales_only_and_so_cannot_undo_a_shift():
    observed, y, m = _miscalibrated()
    _, a, b = fit_calibration(observed - 4, y, m, multilabel=True, method="temperature")   # scale alone: T = 3
    assert a[0] == pytest.approx(1 / 3, rel=0.05) and b[0] == 0
    _, a_t, _ = fit_calibration(observed, y, m, multilabel=True, method="temperature")
    _, a_p, b_p = fit_calibration(observed, y, m, multilabel=True, method="platt")
    assert nll(observed[:, 0] * a_p[0] + b_p[0], y[:, 0], True) < nll(observed[:, 0] * a_t[0], y[:, 0], True) - 0.01


def test_a_finding_without_both_classes_or_labels_is_left_as_it_is():
    observed, y, m = _miscalibrated(2000)
    z = np.hstack([observed, observed, observed])
    yy = np.hstack([y, np.ones_like(y), y])
    mm = np.hstack([m, m, np.zeros_like(m)])
    _, a, b = fit_calibration(z, yy, mm, multilabel=True)
    assert a[0] != 1 and (a[1:] == 1).all() and (b[1:] == 0).all()
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(z, yy, mm, multilabel=True, method="isotonic")


def _loader(n: int = 96, findings: int = 3, seed: int = 0, one_hot: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    if one_hot:
        y = torch.nn.functional.one_hot(torch.randint(0, findings, (n,), generator=g), findings).float()
    else:
        y = (torch.rand(n, findings, generator=g) < 0.3).float()
    return DataLoader(TensorDataset(x, y, torch.ones_like(y)), batch_size=32)


@pytest.mark.parametrize("multilabel", [True, False])
def test_calibration_is_folded_into_the_head_keeping_each_findings_ranking(multilabel):
    torch.manual_seed(0)
    model = SmallCNN(3).eval()
    with torch.no_grad():   # an over-confident, biased head, so the fit has something to undo
        model.fc.weight.mul_(20)
        model.fc.bias.add_(3)
    loader = _loader(one_hot=not multilabel)
    z, y, _ = logits_of(model, loader)
    record = calibrate(model, loader, ["a", "b", "c"], multilabel)
    after, _, _ = logits_of(model, loader)
    a, b = np.array(list(record["scale"].values())), np.array(list(record["shift"].values()))
    assert record["method"] == ("platt" if multilabel else "temperature")
    assert not np.allclose(a, 1), a
    assert after == pytest.approx(z * a + b, rel=1e-4, abs=1e-4)     # the model itself now gives a z + b
    assert (np.argsort(after, axis=0) == np.argsort(z, axis=0)).all()   # a > 0: each finding's ranking kept
    assert record["val_nll"]["after"] < record["val_nll"]["before"]
    if not multilabel:
        assert (b == 0).all() and np.allclose(a, a[0])   # one temperature for the shared softmax


def test_folding_checks_the_heads_size():
    with pytest.raises(ValueError, match="for a head of 3 outputs"):
        fold_calibration(SmallCNN(3), np.ones(2), np.zeros(2))
