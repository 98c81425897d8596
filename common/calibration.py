"""Calibration of an exported model's probabilities on the validation split: Platt scaling (sigmoid(a z + b) per
finding; Platt 1999) by default, temperature scaling (z / T; Guo et al. 2017) as the alternative.

Why: the inference API serves probabilities, and a federated global model under label skew is badly
calibrated. On PneumoniaMNIST, Dirichlet α = 0.3, its test ECE is 0.37 where centralised training gives 0.12:
its mean predicted probability is 1.00 against a prevalence of 0.62, a shifted logit that a temperature (a
scale) cannot move and Platt's shift can (measured in the README, "Calibration").
- Sigmoid outputs are calibrated per finding, since each finding is its own binary classifier. Softmax
  outputs get one temperature for all classes.
- The fit minimises the negative log-likelihood on the validation split that already chose the kept epoch or
  round and will choose the thresholds. The test split stays untouched.
- The map is folded into the classifier head (weight rows and bias), so the bundle, the ONNX export, Grad-CAM
  and every other consumer see the calibrated model with no extra step.
- The scale stays positive, so a sigmoid finding's ranking, and its AUC, are unchanged. The caller tunes the
  thresholds again on the calibrated validation probabilities.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, logsumexp
from torch import nn
from torch.utils.data import DataLoader

from common.models import classifier_head

T_BOUNDS = (0.05, 20.0)   # temperatures outside this range mean a broken fit, not a calibration


@torch.no_grad()
def logits_of(model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, mask) over a loader, in eval mode, as float64."""
    model.eval()
    dev = next(model.parameters()).device
    zs, ys, ms = [], [], []
    for x, y, m in loader:
        zs.append(model(x.to(dev)).double().cpu().numpy())
        ys.append(y.numpy())
        ms.append(m.numpy())
    if not zs:
        raise ValueError("cannot calibrate on an empty validation split")
    z = np.concatenate(zs)
    if not np.isfinite(z).all():
        raise ValueError("cannot calibrate: the model gives NaN/inf logits on the validation split")
    return z, np.concatenate(ys).astype(np.float64), np.concatenate(ms).astype(bool)


def nll(z: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """Mean negative log-likelihood of labels y under logits z: binary per entry (z, y 1-D), or softmax per row
    (z, y 2-D, y one-hot)."""
    if multilabel:
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), y.argmax(1)]))


def _fit_temperature(z: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """1 / T for the T in T_BOUNDS minimising nll(z / T). The NLL is convex in 1 / T, so a bounded scalar search
    finds it."""
    lo, hi = T_BOUNDS
    res = minimize_scalar(lambda beta: nll(z * beta, y, multilabel), bounds=(1 / hi, 1 / lo), method="bounded",
                          options={"xatol": 1e-5})
    return float(res.x) if res.success and math.isfinite(res.x) else 1.0


def _fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of Platt scaling, sigmoid(a z + b), by maximum likelihood on Platt's smoothed targets
    ((n+ + 1) / (n+ + 2) for a positive, 1 / (n- + 2) for a negative: no infinite fit on a separable split).
    a stays positive (in 1 / T_BOUNDS), so the finding's ranking, and its AUC, cannot change."""
    pos = y > 0.5
    t = np.where(pos, (pos.sum() + 1.0) / (pos.sum() + 2.0), 1.0 / ((~pos).sum() + 2.0))

    def loss(ab):
        s = ab[0] * z + ab[1]
        sig = expit(s)
        return float(np.mean(np.logaddexp(0.0, s) - t * s)), np.array([np.mean((sig - t) * z), np.mean(sig - t)])

    lo, hi = T_BOUNDS
    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(1 / hi, 1 / lo), (None, None)])
    a, b = (float(v) for v in res.x)
    return (a, b) if math.isfinite(a) and math.isfinite(b) else (1.0, 0.0)


def fit_calibration(z: np.ndarray, y: np.ndarray, mask: np.ndarray, multilabel: bool,
                    method: str = "platt") -> tuple[str, np.ndarray, np.ndarray]:
    """(method used, scale a (F,), shift b (F,)): calibrated logits are a * z + b, per output.

    platt: per finding over its labelled entries (sigmoid outputs). Softmax outputs share one softmax, where a
    per-class affine map would reorder classes; they get temperature scaling under either method.
    temperature: a = 1 / T, b = 0, one T per finding (sigmoid) or one for all classes (softmax).
    A finding with no labelled entries or only one class among them keeps a = 1, b = 0."""
    if method not in ("platt", "temperature"):
        raise ValueError(f"unknown calibration method {method!r}; platt, temperature or none")
    f = z.shape[1]
    a, b = np.ones(f), np.zeros(f)
    if not multilabel:
        return "temperature", np.full(f, _fit_temperature(z, y, False)), b
    for j in range(f):
        zj, yj = z[mask[:, j], j], y[mask[:, j], j]
        if len(np.unique(yj)) < 2:
            continue
        if method == "platt":
            a[j], b[j] = _fit_platt(zj, yj)
        else:
            a[j] = _fit_temperature(zj, yj, True)
    return method, a, b


@torch.no_grad()
def fold_calibration(model: nn.Module, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make the classifier head output scale * logits + shift, in place: weight rows times scale, bias times
    scale plus shift. No extra module, so every consumer of the weights gets the calibrated outputs."""
    head = classifier_head(model)
    a = torch.as_tensor(np.asarray(scale), dtype=head.weight.dtype, device=head.weight.device)
    b = torch.as_tensor(np.asarray(shift), dtype=head.weight.dtype, device=head.weight.device)
    if a.shape != (head.out_features,) or b.shape != (head.out_features,):
        raise ValueError(f"{a.numel()} scales and {b.numel()} shifts for a head of {head.out_features} outputs")
    head.weight.mul_(a[:, None])
    if head.bias is not None:
        head.bias.mul_(a).add_(b)
    elif bool((b != 0).any()):
        raise ValueError("the classifier head has no bias to carry the calibration's shift")


def calibrate(model: nn.Module, loader: DataLoader, findings: list[str], multilabel: bool,
              method: str = "platt") -> dict:
    """Fit the calibration on `loader` (the validation split) and fold it into `model`. Returns what the bundle
    records: the method, every finding's scale and shift, and the validation NLL before and after."""
    z, y, m = logits_of(model, loader)
    used, a, b = fit_calibration(z, y, m, multilabel, method)

    def val_nll(za: np.ndarray) -> float:
        if not multilabel:
            return nll(za, y, False)
        return float(np.mean([nll(za[m[:, j], j], y[m[:, j], j], True) for j in range(z.shape[1]) if m[:, j].any()]))

    before, after = val_nll(z), val_nll(z * a + b)
    fold_calibration(model, a, b)
    return {"method": used, "fitted_on": "validation split",
            "scope": "per finding" if multilabel else "one temperature for all classes (softmax)",
            "scale": {f: round(float(x), 5) for f, x in zip(findings, a)},
            "shift": {f: round(float(x), 5) for f, x in zip(findings, b)},
            "val_nll": {"before": round(before, 5), "after": round(after, 5)}}


__all__ = ["T_BOUNDS", "calibrate", "fit_calibration", "fold_calibration", "logits_of", "nll"]
