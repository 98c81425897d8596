"""Clinical metrics for multi-label (and one-vs-rest multi-class) chest X-ray classification.

Plain functions over numpy arrays, shared by centralised training, the Flower server's global evaluation,
the federated clients, the simulations and the model card, so every number in the project means the same.

Conventions:
* ``y_true`` (N, F) in {0, 1}; ``y_prob`` (N, F) probabilities; a 1-D array is one finding.
* ``mask`` (N, F) bool, False = label unknown (CheXpert U-Ignore): the entry is left out of that finding's
  metrics. A NaN in ``y_true`` is treated as masked too.
* A case is predicted positive when ``prob >= threshold``.
* Zero division (no predicted positives, no positives, no negatives) gives 0, as scikit-learn's
  ``zero_division=0``; AUC is undefined (None + a note) when a finding lacks either class.
* Calibration: expected calibration error (ECE) over ECE_BINS equal-width probability bins, beside the
  discrimination metrics (DP and federated models are where calibration drifts while AUC holds).
* Results are JSON-serialisable: plain floats/ints/lists, NaN -> None.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import (multilabel_confusion_matrix, precision_recall_curve, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)

HEADLINE = ("accuracy", "precision", "recall", "f1", "auc")  # the seed paper's order
SEED_PAPER = {"accuracy": 0.914, "precision": 0.892, "recall": 0.925, "f1": 0.908, "auc": 0.941}
_RATES = ("accuracy", "precision", "recall", "specificity", "f1")
ECE_BINS = 15  # equal-width bins over [0, 1] for ECE and reliability diagrams (the common choice, Guo et al. 2017)
_EPS = 1e-6  # thresholds are clipped to [_EPS, 1 - _EPS] so they stay strictly inside (0, 1)


# ----------------------------------------------------------------------------- input handling
def _prepare(y_true, y_prob, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D float arrays plus a bool mask that also hides NaN labels; shape errors say which input is wrong."""
    y_true = np.asarray(y_true, dtype=float)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_prob.ndim == 1:
        y_prob = y_prob[:, None]
    if y_true.ndim != 2 or y_true.shape != y_prob.shape:
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} must be the same (N, F) shape")
    m = np.ones(y_true.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(y_true.shape[0], -1)
    if m.shape != y_true.shape:
        raise ValueError(f"mask {m.shape} must match y_true {y_true.shape}")
    m = m & np.isfinite(y_true)
    if not np.isfinite(y_prob[m]).all():
        raise ValueError("y_prob has NaN/inf at labelled entries")
    return y_true, y_prob, m


def _thresholds(thresholds, n_findings: int) -> np.ndarray:
    """None -> 0.5 each; a scalar is broadcast; otherwise one per finding."""
    t = np.full(n_findings, 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    t = np.broadcast_to(t, (n_findings,)) if t.ndim == 0 else t
    if t.shape != (n_findings,):
        raise ValueError(f"need {n_findings} thresholds, got {t.shape}")
    return t.astype(float)


def _num(x) -> float | None:
    """Plain float for JSON; NaN/inf/None -> None."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


# ----------------------------------------------------------------------------- metric math (scikit-learn)
def _scores(y: np.ndarray, yhat: np.ndarray, w: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall, specificity and F1 of 0/1 labels and predictions: the one place they are computed.

    scikit-learn's precision_recall_fscore_support over both classes with zero_division=0; specificity is the
    recall of the negative class. `w`: sample weights (bootstrap counts). Needs at least one case.
    """
    prec, rec, f1, _ = precision_recall_fscore_support(y, yhat, labels=[0, 1], zero_division=0, sample_weight=w)
    return {"precision": float(prec[1]), "recall": float(rec[1]), "specificity": float(rec[0]), "f1": float(f1[1])}


def _rates(y: np.ndarray, yhat: np.ndarray) -> tuple[dict[str, float], list[list[int]]]:
    """Accuracy and `_scores`, and the confusion [[tn, fp], [fn, tp]] from multilabel_confusion_matrix.

    No labelled case: accuracy is undefined (NaN), the rest 0 (scikit-learn refuses empty input).
    """
    if len(y) == 0:
        return {"accuracy": math.nan, "precision": 0.0, "recall": 0.0, "specificity": 0.0, "f1": 0.0}, [[0, 0], [0, 0]]
    (tn, fp), (fn, tp) = multilabel_confusion_matrix(y, yhat, labels=[1])[0].tolist()
    return {"accuracy": (tp + tn) / len(y), **_scores(y, yhat)}, [[int(tn), int(fp)], [int(fn), int(tp)]]


def _auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """ROC AUC (ties count 1/2), NaN when a class is missing (undefined); `w`: sample weights."""
    w = np.ones(len(y)) if w is None else w
    pos = float((w * y).sum())
    return float(roc_auc_score(y, p, sample_weight=w)) if 0 < pos < float(w.sum()) else math.nan


def _bin_ids(p: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each probability over equal-width edges; the same assignment as sklearn's calibration_curve
    (searchsorted on the inner edges: a value on an edge falls in the lower bin, 1.0 in the last)."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p)


def _ece(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (n_bin / n) * |mean(label) - mean(prob)|; NaN without cases.

    numpy rather than sklearn.calibration.calibration_curve: that drops empty bins and returns no counts (the
    weights of the sum), and takes no sample weights (the bootstrap's resamples)."""
    w = np.ones(len(y)) if w is None else w
    total = float(w.sum())
    if total == 0:
        return math.nan
    ids = _bin_ids(p, n_bins)
    gap = np.abs(np.bincount(ids, weights=w * y, minlength=n_bins) - np.bincount(ids, weights=w * p, minlength=n_bins))
    return float(gap.sum() / total)  # (n_b / n) * |sum_b(y) / n_b - sum_b(p) / n_b| = |sum_b(y) - sum_b(p)| / n


def reliability_data(y_true, y_prob, mask=None, finding: int | None = None, n_bins: int = ECE_BINS) -> dict:
    """What a reliability diagram draws, for one finding (column index) or pooled over all findings (None):
    bin edges, per-bin mean predicted probability and fraction positive (None in an empty bin), counts, and
    the ECE. Masked entries are left out."""
    y_true, y_prob, m = _prepare(y_true, y_prob, mask)
    if finding is None:
        y, p = y_true[m], y_prob[m]
    else:
        y, p = y_true[m[:, finding], finding], y_prob[m[:, finding], finding]
    ids = _bin_ids(p, n_bins)
    cnt = np.bincount(ids, minlength=n_bins)
    sums_p, sums_y = np.bincount(ids, weights=p, minlength=n_bins), np.bincount(ids, weights=y, minlength=n_bins)
    per = lambda s: [float(s[b] / cnt[b]) if cnt[b] else None for b in range(n_bins)]  # noqa: E731
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(), "mean_prob": per(sums_p), "frac_pos": per(sums_y),
            "counts": [int(c) for c in cnt], "n": int(len(y)), "ece": _num(_ece(y, p, n_bins=n_bins))}


def _percentile_ci(values: list[float]) -> list[float] | None:
    v = np.asarray([x for x in values if math.isfinite(x)])
    return None if v.size == 0 else [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


# ----------------------------------------------------------------------------- public API
def tune_thresholds(y_true, y_prob, method: str = "f1", mask=None) -> np.ndarray:
    """Per-finding decision threshold chosen on validation data (F,) float.

    "f1": the score on the precision-recall curve with the highest F1 (findings are imbalanced, so 0.5 is
    rarely right); "youden": argmax(TPR - FPR) on the ROC curve (balances sensitivity and specificity).
    A finding with no positives or no negatives has no curve to optimise: it keeps 0.5. Thresholds are
    clipped to [1e-6, 1 - 1e-6] so they stay inside (0, 1).
    """
    if method not in ("f1", "youden"):
        raise ValueError(f"method must be 'f1' or 'youden', got {method!r}")
    y_true, y_prob, m = _prepare(y_true, y_prob, mask)
    out = np.full(y_true.shape[1], 0.5)
    for j in range(y_true.shape[1]):
        y, p = y_true[m[:, j], j], y_prob[m[:, j], j]
        if not 0 < y.sum() < len(y):
            continue
        if method == "f1":
            prec, rec, thr = precision_recall_curve(y, p)
            prec, rec = prec[: len(thr)], rec[: len(thr)]  # last point (p=1, r=0) has no threshold
            f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(prec), where=(prec + rec) > 0)
            out[j] = thr[int(np.argmax(f1))]
        else:
            fpr, tpr, thr = roc_curve(y, p)
            out[j] = thr[int(np.argmax(tpr - fpr))]
    return np.clip(out, _EPS, 1 - _EPS)


def macro_f1(y_true, y_prob, thresholds, mask=None) -> float:
    """Mean per-finding F1 at the given thresholds (findings without a labelled case left out); what epochs and
    rounds are selected by (compute_metrics counts a finding without labelled cases as F1 0 in its macro)."""
    y_true, y_prob, m = _prepare(y_true, y_prob, mask)
    pred = y_prob >= _thresholds(thresholds, y_true.shape[1])
    f1 = [_scores(y_true[m[:, j], j], pred[m[:, j], j])["f1"] for j in range(y_true.shape[1]) if m[:, j].any()]
    return float(np.mean(f1)) if f1 else math.nan


def compute_metrics(y_true, y_prob, findings, thresholds=None, mask=None, bootstrap: int = 0, seed: int = 0) -> dict:
    """Per-finding, macro and micro clinical metrics and ECE, plus the headline: the seed paper's five figures
    (= macro, HEADLINE) and the macro ECE after them, so every table built from it can show calibration.

    thresholds None -> 0.5 each. bootstrap > 0 resamples rows with np.random.default_rng(seed) and gives
    percentile 95% CIs of each finding's AUC and F1 and of macro AUC/F1/ECE; resamples where an AUC is
    undefined are skipped for that AUC (for macro AUC: where any finding with a defined AUC loses it).
    """
    y_true, y_prob, m = _prepare(y_true, y_prob, mask)
    n, n_find = y_true.shape
    findings = [str(f) for f in findings]
    if len(findings) != n_find:
        raise ValueError(f"{len(findings)} finding names for {n_find} columns")
    thr = _thresholds(thresholds, n_find)
    pred = (y_prob >= thr).astype(float)

    per_finding: dict[str, dict] = {}
    notes: list[str] = []
    for j, name in enumerate(findings):
        mj = m[:, j]
        y, p = y_true[mj, j], y_prob[mj, j]
        rates, confusion = _rates(y, pred[mj, j])
        (tn, fp), (fn, tp) = confusion
        auc = _auc(y, p)
        if len(y) == 0:
            notes.append(f"{name}: no labelled cases in this split; metrics undefined")
        elif tp + fn == 0:
            notes.append(f"{name}: no positive cases in this split; AUC undefined")
        elif tn + fp == 0:
            notes.append(f"{name}: no negative cases in this split; AUC undefined")
        per_finding[name] = {
            **{k: _num(v) for k, v in rates.items()},
            "auc": _num(auc), "ece": _num(_ece(y, p)),
            "support": int(tp + fn), "negatives": int(tn + fp), "n": int(len(y)), "threshold": float(thr[j]),
            "confusion": confusion, "auc_ci": None, "f1_ci": None,
        }

    def mean_of(key: str) -> float | None:
        vals = [r[key] for r in per_finding.values() if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    macro = {k: mean_of(k) for k in (*_RATES, "auc", "ece")}
    micro = {k: _num(v) for k, v in _rates(y_true[m], pred[m])[0].items()}
    micro["auc"] = _num(_auc(y_true[m], y_prob[m]))
    micro["ece"] = _num(_ece(y_true[m], y_prob[m]))

    result = {
        "n": int(n), "thresholds": [float(t) for t in thr], "per_finding": per_finding,
        "macro": macro, "micro": micro, "headline": {**{k: macro[k] for k in HEADLINE}, "ece": macro["ece"]},
        "headline_ci": None, "notes": notes,
    }
    if bootstrap > 0 and n > 0:
        _bootstrap(result, y_true, y_prob, pred, m, findings, bootstrap, seed)
    return result


def _bootstrap(result: dict, y_true, y_prob, pred, m, findings, n_boot: int, seed: int) -> None:
    """Fill auc_ci/f1_ci and headline_ci (macro AUC, F1, ECE) in place. A resample of the rows is a vector of
    integer weights (how often each row was drawn), handed to scikit-learn (and _ece) as sample_weight: the same
    numbers as the resampled rows."""
    rng = np.random.default_rng(seed)
    n, n_find = y_true.shape
    cols = [np.flatnonzero(m[:, j]) for j in range(n_find)]
    defined = [result["per_finding"][f]["auc"] is not None for f in findings]
    aucs = np.full((n_boot, n_find), math.nan)
    f1s = np.full((n_boot, n_find), math.nan)
    eces = np.full((n_boot, n_find), math.nan)
    for b in range(n_boot):
        w_all = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(float)
        for j, c in enumerate(cols):
            w = w_all[c]
            if w.sum() == 0:
                continue
            f1s[b, j] = _scores(y_true[c, j], pred[c, j], w)["f1"]
            eces[b, j] = _ece(y_true[c, j], y_prob[c, j], w)
            if defined[j]:
                aucs[b, j] = _auc(y_true[c, j], y_prob[c, j], w)
    for j, name in enumerate(findings):
        if defined[j]:
            result["per_finding"][name]["auc_ci"] = _percentile_ci(aucs[:, j].tolist())
        if result["per_finding"][name]["n"] > 0:
            result["per_finding"][name]["f1_ci"] = _percentile_ci(f1s[:, j].tolist())
    macro_auc = [float(np.mean(row[defined])) if any(defined) and np.isfinite(row[defined]).all() else math.nan
                 for row in aucs]
    macro_f1s = [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in f1s]
    macro_eces = [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in eces]
    result["headline_ci"] = {"auc": _percentile_ci(macro_auc), "f1": _percentile_ci(macro_f1s),
                             "ece": _percentile_ci(macro_eces)}


# ----------------------------------------------------------------------------- text tables
def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.1f}"


def trivial_baseline(metrics: Mapping) -> dict | None:
    """What calling every image positive scores on the same images (macro over findings): accuracy =
    precision = prevalence, recall 1, specificity 0, AUC 0.5. A result is only worth its gap to this."""
    per = [r for r in metrics.get("per_finding", {}).values() if r.get("n")]
    if not per:
        return None
    prev = [r["support"] / r["n"] for r in per]
    f1 = [2 * p / (1 + p) if p > 0 else 0.0 for p in prev]
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {"accuracy": mean(prev), "precision": mean(prev), "recall": 1.0, "specificity": 0.0, "f1": mean(f1),
            "auc": 0.5}


TABLE_COLUMNS = (("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"),
                 ("Specificity", "specificity"), ("F1", "f1"), ("AUC", "auc"), ("ECE", "ece"))
SEED_PAPER_NAME = "seed paper (ResNet50 on ChestX-ray14, as reported)"


def format_headline_table(rows: Mapping[str, Mapping], *, reference: Mapping | None = None,
                          reference_name: str = SEED_PAPER_NAME, baseline: bool = True,
                          title: str | None = None) -> str:
    """Fixed-width table (Accuracy, Precision, Recall, Specificity, F1, AUC, ECE as % with one decimal), one row
    per run, then the all-positive baseline on the first row's images and, only when given (`--compare-paper`),
    a reference row such as the seed paper's reported figures (ECE n/a where a row has none: the paper reports
    none, and the all-positive baseline is a decision rule, not a probability)."""
    table = [(name, _headline(r)) for name, r in rows.items()]
    extra = []
    first = next(iter(rows.values()), None)
    if baseline and first is not None and (b := trivial_baseline(first)) is not None:
        extra.append(("all-positive baseline", b))
    if reference is not None:
        extra.append((reference_name, reference))
    heads = [h for h, _ in TABLE_COLUMNS]
    width = max([len("Model")] + [len(name) for name, _ in table + extra])
    line = lambda name, cells: f"{name:<{width}}  " + "  ".join(f"{c:>11}" for c in cells)  # noqa: E731
    rule = "-" * len(line("", heads))
    out = [title] if title else []
    out += [line("Model", heads), rule]
    out += [line(name, [_pct(h.get(k)) for _, k in TABLE_COLUMNS]) for name, h in table]
    if extra:
        out.append(rule)
        out += [line(name, [_pct(h.get(k)) for _, k in TABLE_COLUMNS]) for name, h in extra]
    return "\n".join(out)


def _headline(r: Mapping) -> Mapping:
    """The headline figures plus the macro specificity (and ECE, for a headline saved before it had one)."""
    h = dict(r.get("headline", r))
    for k in ("specificity", "ece"):
        if k not in h and isinstance(r.get("macro"), Mapping):
            h[k] = r["macro"].get(k)
    return h


def format_per_finding_table(metrics: Mapping) -> str:
    """Per-finding table (n, positives, AUC [95% CI], ECE, F1, precision, recall, specificity, accuracy,
    threshold) with macro and micro rows and the notes, for logs and the model card."""
    heads = ("n", "Pos", "AUC", "AUC 95% CI", "ECE", "F1", "Prec", "Recall", "Spec", "Acc", "Thr")
    rows = []
    for name, r in metrics["per_finding"].items():
        ci = r.get("auc_ci")
        rows.append((name, [str(r["n"]), str(r["support"]), _pct(r["auc"]),
                            f"{_pct(ci[0])}-{_pct(ci[1])}" if ci else "", _pct(r.get("ece")), _pct(r["f1"]),
                            _pct(r["precision"]), _pct(r["recall"]), _pct(r["specificity"]), _pct(r["accuracy"]),
                            f"{r['threshold']:.3f}"]))
    for agg in ("macro", "micro"):
        a = metrics[agg]
        rows.append((agg, ["", "", _pct(a["auc"]), "", _pct(a.get("ece")), _pct(a["f1"]), _pct(a["precision"]),
                           _pct(a["recall"]), _pct(a["specificity"]), _pct(a["accuracy"]), ""]))
    width = max([len("Finding")] + [len(name) for name, _ in rows])
    line = lambda name, cells: f"{name:<{width}}  " + "  ".join(f"{c:>11}" if h == "AUC 95% CI" else f"{c:>6}"  # noqa: E731
                                                                 for h, c in zip(heads, cells))
    out = [line("Finding", heads), "-" * len(line("", heads))]
    out += [line(name, cells) for name, cells in rows[:-2]]
    out += ["-" * len(line("", heads))] + [line(name, cells) for name, cells in rows[-2:]]
    out += [f"note: {n}" for n in metrics.get("notes", [])]
    return "\n".join(out)


__all__ = ("HEADLINE", "SEED_PAPER", "ECE_BINS", "tune_thresholds", "compute_metrics", "macro_f1",
           "reliability_data", "trivial_baseline", "format_headline_table", "format_per_finding_table")
