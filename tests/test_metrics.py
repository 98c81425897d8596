"""common.metrics / common.plots against hand-computed values."""
from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest
from common import plots
from common.metrics import (ECE_BINS, HEADLINE, SEED_PAPER, compute_metrics, format_headline_table,
                            format_per_finding_table, macro_f1, reliability_data, tune_thresholds)

EXACT = dict(rel=1e-12, abs=1e-12)

# 8 samples, 2 findings. At threshold 0.5:
#   A: y    1   1   1   0   0   0   0   1      B: y    0   0   0   0   0    0   1   1
#      p  .9  .8  .3  .6  .2  .1  .4  .7         p  .1  .2  .6  .3  .55  .4  .9  .4
#      pred 1   1   0   1   0   0   0   1         pred 0   0   1   0   1    0   1   0
#   A: TP=3 FP=1 FN=1 TN=3     B: TP=1 FP=2 FN=1 TN=4
Y = np.array([[1, 0], [1, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 1], [1, 1]], dtype=float)
P = np.array([[.9, .1], [.8, .2], [.3, .6], [.6, .3], [.2, .55], [.1, .4], [.4, .9], [.7, .4]])
NAMES = ["A", "B"]


def pair_auc(y, p):
    """AUC by counting (positive, negative) pairs ranked right, ties counting 1/2."""
    pos, neg = [s for s, t in zip(p, y) if t == 1], [s for s, t in zip(p, y) if t == 0]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)) / (len(pos) * len(neg))


def test_hand_computed_per_finding():
    r = compute_metrics(Y, P, NAMES)
    a, b = r["per_finding"]["A"], r["per_finding"]["B"]
    assert a["confusion"] == [[3, 1], [1, 3]] and b["confusion"] == [[4, 2], [1, 1]]
    tp, fp, fn, tn = 3, 1, 1, 3
    assert a["precision"] == pytest.approx(tp / (tp + fp), **EXACT)
    assert a["recall"] == pytest.approx(tp / (tp + fn), **EXACT)
    assert a["specificity"] == pytest.approx(tn / (tn + fp), **EXACT)
    assert a["f1"] == pytest.approx(0.75, **EXACT)
    assert a["accuracy"] == pytest.approx(6 / 8, **EXACT)
    assert (a["support"], a["negatives"], a["n"], a["threshold"]) == (4, 4, 8, 0.5)
    tp, fp, fn, tn = 1, 2, 1, 4
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    assert b["precision"] == pytest.approx(1 / 3, **EXACT)
    assert b["recall"] == pytest.approx(0.5, **EXACT)
    assert b["specificity"] == pytest.approx(4 / 6, **EXACT)
    assert b["f1"] == pytest.approx(2 * prec * rec / (prec + rec), **EXACT) == pytest.approx(0.4)
    assert b["accuracy"] == pytest.approx(5 / 8, **EXACT)
    # AUC: A = 14/16; B has a tie (0.4 vs 0.4) -> (6 + 3.5) / 12
    assert a["auc"] == pytest.approx(pair_auc(Y[:, 0], P[:, 0]), **EXACT) == pytest.approx(14 / 16)
    assert b["auc"] == pytest.approx(pair_auc(Y[:, 1], P[:, 1]), **EXACT) == pytest.approx(9.5 / 12)
    assert r["n"] == 8 and r["thresholds"] == [0.5, 0.5] and r["notes"] == []


def test_macro_vs_micro():
    r = compute_metrics(Y, P, NAMES)
    macro, micro = r["macro"], r["micro"]
    assert macro["precision"] == pytest.approx((3 / 4 + 1 / 3) / 2, **EXACT)
    assert macro["f1"] == pytest.approx((0.75 + 0.4) / 2, **EXACT)
    assert macro["auc"] == pytest.approx((14 / 16 + 9.5 / 12) / 2, **EXACT)
    # pooled: TP=4 FP=3 FN=2 TN=7
    assert micro["precision"] == pytest.approx(4 / 7, **EXACT)
    assert micro["recall"] == pytest.approx(4 / 6, **EXACT)
    assert micro["specificity"] == pytest.approx(7 / 10, **EXACT)
    assert micro["f1"] == pytest.approx(8 / 13, **EXACT)
    assert micro["accuracy"] == pytest.approx(11 / 16, **EXACT)
    assert micro["auc"] == pytest.approx(pair_auc(Y.ravel(), P.ravel()), **EXACT)
    assert macro["precision"] != pytest.approx(micro["precision"])
    assert macro["f1"] != pytest.approx(micro["f1"])
    assert r["headline"] == {**{k: macro[k] for k in HEADLINE}, "ece": macro["ece"]}
    assert macro_f1(Y, P, [0.5, 0.5]) == pytest.approx(macro["f1"], **EXACT)


def test_finding_without_positives():
    y = np.c_[Y, np.zeros(8)]
    p = np.c_[P, np.linspace(0.05, 0.4, 8)]  # nothing predicted positive either
    r = compute_metrics(y, p, ["A", "B", "Hernia"], bootstrap=20)
    h = r["per_finding"]["Hernia"]
    assert h["auc"] is None and h["auc_ci"] is None and h["support"] == 0
    assert h["precision"] == 0.0 and h["recall"] == 0.0  # zero_division=0
    assert h["confusion"] == [[8, 0], [0, 0]] and h["specificity"] == 1.0
    assert any("Hernia" in n and "no positive" in n for n in r["notes"])
    assert r["macro"]["auc"] == pytest.approx((14 / 16 + 9.5 / 12) / 2)  # mean where defined
    assert tune_thresholds(y, p)[2] == 0.5


def test_no_negatives_and_fully_masked():
    y = np.c_[Y[:, 0], np.ones(8), np.ones(8)]
    p = np.c_[P[:, 0], P[:, 0], P[:, 0]]
    mask = np.ones_like(y, dtype=bool)
    mask[:, 2] = False
    r = compute_metrics(y, p, ["A", "X", "Gone"], mask=mask, bootstrap=10)
    assert r["per_finding"]["X"]["auc"] is None and r["per_finding"]["X"]["specificity"] == 0.0
    assert r["per_finding"]["Gone"]["n"] == 0 and r["per_finding"]["Gone"]["accuracy"] is None
    assert any("X: no negative" in n for n in r["notes"]) and any("Gone:" in n for n in r["notes"])
    json.dumps(r, allow_nan=False)


def test_mask_excludes_entries():
    mask = np.ones_like(Y, dtype=bool)
    mask[[0, 3], 0] = False  # A loses one TP and one FP
    mask[6, 1] = False       # B loses its TP
    r = compute_metrics(Y, P, NAMES, mask=mask)
    y2, p2 = Y.copy(), P.copy()
    y2[[0, 3], 0] = 1 - y2[[0, 3], 0]
    y2[6, 1] = np.nan
    p2[[0, 3, 6], [0, 0, 1]] = [0.01, 0.99, 0.0]
    assert compute_metrics(y2, p2, NAMES, mask=mask) == r
    assert r["per_finding"]["A"]["confusion"] == [[3, 0], [1, 2]] and r["per_finding"]["A"]["n"] == 6
    assert r["per_finding"]["B"]["confusion"] == [[4, 2], [1, 0]]
    assert r["per_finding"]["A"]["auc"] == pytest.approx(pair_auc(np.delete(Y[:, 0], [0, 3]), np.delete(P[:, 0], [0, 3])))
    assert macro_f1(y2, p2, 0.5, mask=mask) == pytest.approx(r["macro"]["f1"])
    assert (tune_thresholds(y2, p2, mask=mask) == tune_thresholds(Y, P, mask=mask)).all()


def test_tune_thresholds_f1_is_best_achievable():
    # scores .1 .2 .3 .4 .6 .7, labels 0 0 1 0 1 1: F1 at >=.3 is 6/7 (TP3 FP1), the best; at 0.5 it is 0.8
    y = np.array([0, 0, 1, 0, 1, 1], dtype=float)
    p = np.array([.1, .2, .3, .4, .6, .7])
    t = tune_thresholds(y, p, "f1")
    assert t.shape == (1,) and t[0] == pytest.approx(0.3)
    f1_tuned = compute_metrics(y, p, ["x"], thresholds=t)["per_finding"]["x"]["f1"]
    f1_half = compute_metrics(y, p, ["x"])["per_finding"]["x"]["f1"]
    best = max(compute_metrics(y, p, ["x"], thresholds=[c])["per_finding"]["x"]["f1"] for c in p)
    assert f1_tuned == pytest.approx(6 / 7) == pytest.approx(best) and f1_tuned >= f1_half == pytest.approx(0.8)
    # on real-ish multi-finding data it never does worse than 0.5
    rng = np.random.default_rng(1)
    yy = (rng.random((200, 3)) < [0.1, 0.3, 0.5]).astype(float)
    pp = np.clip(0.3 * yy + rng.random((200, 3)) * 0.7, 0, 1)
    tt = tune_thresholds(yy, pp)
    assert ((tt > 0) & (tt < 1)).all()
    f1s = lambda th: [compute_metrics(yy, pp, list("abc"), thresholds=th)["per_finding"][k]["f1"] for k in "abc"]  # noqa: E731
    assert all(a >= b for a, b in zip(f1s(tt), f1s(None)))


def test_tune_thresholds_youden_separates():
    y = np.array([0, 0, 0, 1, 1], dtype=float)
    p = np.array([.6, .65, .7, .8, .9])  # 0.5 would call everything positive
    t = tune_thresholds(y, p, "youden")
    assert 0.7 < t[0] <= 0.8
    assert compute_metrics(y, p, ["x"], thresholds=t)["per_finding"]["x"]["accuracy"] == 1.0
    assert compute_metrics(y, p, ["x"])["per_finding"]["x"]["accuracy"] == pytest.approx(0.4)
    # perfectly separated at the extremes: thresholds stay inside (0, 1)
    t = tune_thresholds([0, 1], [0.0, 1.0], "youden")
    assert 0 < t[0] < 1 and compute_metrics([0, 1], [0.0, 1.0], ["x"], thresholds=t)["per_finding"]["x"]["accuracy"] == 1.0
    with pytest.raises(ValueError):
        tune_thresholds(y, p, "bogus")


def hand_f1(y, yhat):
    """F1 by counting: 2 TP / (2 TP + FP + FN), 0 when there is nothing to count."""
    tp = sum(1 for t, h in zip(y, yhat) if t == 1 and h == 1)
    wrong = sum(1 for t, h in zip(y, yhat) if t != h)
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def test_bootstrap_equals_hand_resampled_rows():
    """The CIs come from weighted scikit-learn calls; here each resample's rows are repeated by hand (the same
    draws from the same generator) and scored by pair counting, so the weights must mean "this row, k times"."""
    rng = np.random.default_rng(0)
    y = (rng.random((40, 2)) < 0.4).astype(float)
    p = np.round(rng.random((40, 2)), 1)  # many ties
    mask = rng.random((40, 2)) > 0.1
    r = compute_metrics(y, p, NAMES, mask=mask, bootstrap=30, seed=11)
    draws = np.random.default_rng(11)
    aucs, f1s = [[], []], [[], []]
    for _ in range(30):
        idx = draws.integers(0, 40, size=40)
        for j in range(2):
            rows = idx[mask[idx, j]]
            yy, pp = y[rows, j], p[rows, j]
            f1s[j].append(hand_f1(yy, pp >= 0.5))
            if 0 < yy.sum() < len(yy):
                aucs[j].append(pair_auc(yy, pp))
    for j, name in enumerate(NAMES):
        pf = r["per_finding"][name]
        assert pf["auc_ci"] == pytest.approx([np.percentile(aucs[j], 2.5), np.percentile(aucs[j], 97.5)], **EXACT)
        assert pf["f1_ci"] == pytest.approx([np.percentile(f1s[j], 2.5), np.percentile(f1s[j], 97.5)], **EXACT)
    assert len(aucs[0]) == len(aucs[1]) == 30  # no resample lost a class: the macro CI uses every one
    macro_auc = [(a + b) / 2 for a, b in zip(*aucs)]
    assert r["headline_ci"]["auc"] == pytest.approx([np.percentile(macro_auc, 2.5), np.percentile(macro_auc, 97.5)],
                                                    **EXACT)


def test_bootstrap_ece_ci_equals_the_ece_of_repeated_rows():
    """Macro ECE's CI: each resample's rows repeated by hand (same draws) and scored without weights."""
    rng = np.random.default_rng(5)
    y = (rng.random((40, 2)) < 0.4).astype(float)
    p = rng.random((40, 2))
    mask = rng.random((40, 2)) > 0.1
    r = compute_metrics(y, p, NAMES, mask=mask, bootstrap=25, seed=4)
    draws = np.random.default_rng(4)
    macro = []
    for _ in range(25):
        idx = draws.integers(0, 40, size=40)
        macro.append(compute_metrics(y[idx], p[idx], NAMES, mask=mask[idx])["macro"]["ece"])
    assert r["headline_ci"]["ece"] == pytest.approx([np.percentile(macro, 2.5), np.percentile(macro, 97.5)], **EXACT)
    assert r["headline_ci"]["ece"][0] < r["headline_ci"]["ece"][1]


def test_bootstrap_ci():
    rng = np.random.default_rng(3)
    y = (rng.random((150, 2)) < 0.3).astype(float)
    p = np.clip(0.35 * y + 0.65 * rng.random((150, 2)), 0, 1)
    r = compute_metrics(y, p, NAMES, bootstrap=200, seed=7)
    ci = r["headline_ci"]
    assert ci["auc"][0] <= r["macro"]["auc"] <= ci["auc"][1]
    assert ci["f1"][0] <= r["macro"]["f1"] <= ci["f1"][1]
    for f in NAMES:
        pf = r["per_finding"][f]
        assert pf["auc_ci"][0] <= pf["auc"] <= pf["auc_ci"][1] and pf["f1_ci"][0] <= pf["f1"] <= pf["f1_ci"][1]
    assert compute_metrics(y, p, NAMES, bootstrap=200, seed=7) == r
    assert compute_metrics(y, p, NAMES, bootstrap=200, seed=8)["headline_ci"] != ci
    assert compute_metrics(y, p, NAMES)["headline_ci"] is None


def test_json_serialisable():
    y = np.c_[Y, np.zeros(8)]
    p = np.c_[P, P[:, 0]]
    r = compute_metrics(y, p, ["A", "B", "Hernia"], thresholds=tune_thresholds(y, p), bootstrap=30)
    assert json.loads(json.dumps(r, allow_nan=False)) == r


# ------------------------------------------------------------------------------------------- calibration (ECE)
def test_ece_of_a_known_miscalibration():
    """All probabilities 0.9, half the cases positive: one bin, |0.5 - 0.9| = 0.4."""
    y = np.array([1, 0] * 10, dtype=float)
    r = compute_metrics(y, np.full(20, 0.9), ["A"])
    assert r["per_finding"]["A"]["ece"] == pytest.approx(0.4, abs=1e-12)
    assert r["macro"]["ece"] == r["headline"]["ece"] == r["micro"]["ece"] == pytest.approx(0.4, abs=1e-12)


def test_ece_two_bins_hand_computed():
    """0.1 x 4 (1 positive: |0.25 - 0.1| = 0.15), 0.7 x 6 (4 positives: |2/3 - 0.7|): 0.4 * 0.15 + 0.6 * 0.1/3."""
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=float)
    p = np.array([0.1] * 4 + [0.7] * 6)
    assert compute_metrics(y, p, ["A"])["per_finding"]["A"]["ece"] == pytest.approx(0.4 * 0.15 + 0.6 * 0.1 / 3,
                                                                                     abs=1e-12)


def test_ece_of_a_perfectly_calibrated_construction_is_zero():
    """In every bin the fraction positive equals the (single) probability predicted there."""
    probs, labels = [], []
    for q, n in ((0.1, 10), (0.25, 8), (0.5, 6), (0.8, 10), (0.95, 20)):
        k = round(q * n)
        probs += [q] * n
        labels += [1.0] * k + [0.0] * (n - k)
    r = compute_metrics(np.array(labels), np.array(probs), ["A"])
    assert r["per_finding"]["A"]["ece"] == pytest.approx(0.0, abs=1e-12)
    # and a large calibrated sample (labels drawn with the predicted probability) is close to 0
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(float)
    assert compute_metrics(y, p, ["A"])["per_finding"]["A"]["ece"] < 0.01
    assert compute_metrics(y, p ** 2, ["A"])["per_finding"]["A"]["ece"] > 0.1  # miscalibrated: clearly not


def test_ece_ignores_masked_entries_and_macro_skips_findings_without_cases():
    y = np.array([1, 0] * 10, dtype=float)
    p = np.full(20, 0.9)
    # extra rows that would move the ECE (confident negatives): masked in A, a NaN label in B
    y2 = np.c_[np.r_[y, np.zeros(5)], np.r_[y, np.full(5, np.nan)], np.zeros(25)]
    p2 = np.c_[np.r_[p, np.full(5, 0.99)], np.r_[p, np.full(5, 0.99)], np.full(25, 0.3)]
    mask = np.ones((25, 3), dtype=bool)
    mask[20:, 0] = False
    mask[:, 2] = False  # C: no labelled case at all
    r = compute_metrics(y2, p2, ["A", "B", "C"], mask=mask)
    assert r["per_finding"]["A"]["ece"] == pytest.approx(0.4, abs=1e-12)
    assert r["per_finding"]["B"]["ece"] == pytest.approx(0.4, abs=1e-12)
    assert r["per_finding"]["C"]["ece"] is None
    assert r["macro"]["ece"] == pytest.approx(0.4, abs=1e-12)   # mean over A and B only
    unmasked = compute_metrics(y2[:, :1], p2[:, :1], ["A"])
    assert unmasked["per_finding"]["A"]["ece"] != pytest.approx(0.4)  # the masked rows would have mattered


def test_reliability_data_matches_sklearn_and_compute_metrics():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(1)
    y = (rng.random((300, 2)) < 0.3).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random((300, 2)), 0, 1)
    mask = rng.random((300, 2)) > 0.2
    r = compute_metrics(y, p, NAMES, mask=mask)
    for j, name in enumerate(NAMES):
        d = reliability_data(y, p, mask=mask, finding=j)
        assert len(d["edges"]) == ECE_BINS + 1 and d["edges"][0] == 0.0 and d["edges"][-1] == 1.0
        assert sum(d["counts"]) == d["n"] == int(mask[:, j].sum())
        frac, mean = calibration_curve(y[mask[:, j], j], p[mask[:, j], j], n_bins=ECE_BINS, strategy="uniform")
        full = [b for b, c in enumerate(d["counts"]) if c]
        assert [d["frac_pos"][b] for b in full] == pytest.approx(frac.tolist(), abs=1e-12)
        assert [d["mean_prob"][b] for b in full] == pytest.approx(mean.tolist(), abs=1e-12)
        assert all(d["frac_pos"][b] is None for b, c in enumerate(d["counts"]) if not c)
        hand = sum(c / d["n"] * abs(f - m) for c, f, m in zip(d["counts"], d["frac_pos"], d["mean_prob"]) if c)
        assert d["ece"] == pytest.approx(hand, abs=1e-12) == pytest.approx(r["per_finding"][name]["ece"], abs=1e-12)
    pooled = reliability_data(y, p, mask=mask)
    assert pooled["n"] == int(mask.sum()) and pooled["ece"] == pytest.approx(r["micro"]["ece"], abs=1e-12)


def test_headline_table():
    r = compute_metrics(Y, P, NAMES)
    text = format_headline_table({"centralised": r, "fedavg": r["headline"]}, title="Test split",
                                 reference=SEED_PAPER)
    header = next(line for line in text.splitlines() if "Accuracy" in line)
    assert header.split() == ["Model", "Accuracy", "Precision", "Recall", "Specificity", "F1", "AUC", "ECE"]
    assert text.startswith("Test split")
    row = next(line for line in text.splitlines() if line.startswith("centralised")).split()[1:]
    assert row == [f"{100 * r[m][k]:.1f}" for m, k in (("headline", "accuracy"), ("headline", "precision"),
                                                       ("headline", "recall"), ("macro", "specificity"),
                                                       ("headline", "f1"), ("headline", "auc"),
                                                       ("headline", "ece"))]
    assert r["headline"]["ece"] > 0  # a real number in the ECE column, not a placeholder
    seed = next(line for line in text.splitlines() if line.startswith("seed paper"))
    assert "ChestX-ray14" in seed and seed.split()[-7:] == ["91.4", "89.2", "92.5", "n/a", "90.8", "94.1", "n/a"]
    assert SEED_PAPER["auc"] == 0.941
    # the all-positive baseline on the same images: prevalence as accuracy and precision, recall 1, AUC 0.5
    prev = [p["support"] / p["n"] for p in r["per_finding"].values()]
    base = next(line for line in text.splitlines() if line.startswith("all-positive baseline")).split()[2:]
    assert base == [f"{100 * np.mean(prev):.1f}", f"{100 * np.mean(prev):.1f}", "100.0", "0.0",
                    f"{100 * np.mean([2 * p / (1 + p) for p in prev]):.1f}", "50.0", "n/a"]
    plain = format_headline_table({"x": r})
    assert "seed paper" not in plain and "all-positive baseline" in plain


def test_per_finding_table():
    y = np.c_[Y, np.zeros(8)]
    r = compute_metrics(y, np.c_[P, P[:, 0]], ["A", "B", "Hernia"], bootstrap=20)
    text = format_per_finding_table(r)
    assert all(s in text for s in ("Hernia", "macro", "micro", "87.5", "n/a", "note: Hernia", "ECE"))
    macro_row = next(line for line in text.splitlines() if line.startswith("macro")).split()
    assert macro_row[1] == f"{100 * r['macro']['auc']:.1f}" and macro_row[2] == f"{100 * r['macro']['ece']:.1f}"


def test_plots_write_pngs(tmp_path):
    y = np.c_[Y, np.zeros(8)]
    p = np.c_[P, P[:, 0]]
    r = compute_metrics(y, p, ["A", "B", "Hernia"])
    hist = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_auc": 0.7},
            {"epoch": 2, "train_loss": 0.5, "val_loss": 0.55, "val_auc": 0.78}]
    out = [
        plots.plot_roc_curves(y, p, ["A", "B", "Hernia"], tmp_path / "roc.png", title="ROC"),
        plots.plot_per_finding_bars(r, tmp_path / "bars.png"),
        plots.plot_training_curves(hist, tmp_path / "sub" / "train.png"),
        plots.plot_training_curves([{"round": 1, "val_f1": 0.4}, {"round": 2, "val_f1": 0.5}], tmp_path / "rounds.png"),
        plots.plot_series({"fedavg": [(1, 0.6), (2, 0.7)], "fedprox": [(1, 0.62), (2, 0.71)]},
                          tmp_path / "series.png", "round", "AUC", title="AUC per round"),
        plots.plot_bars({"a": 0.8, "b": 0.7}, tmp_path / "simple.png", "AUC"),
        plots.plot_bars({"iid": {"fedavg": 0.8, "fedprox": 0.81}, "non-iid": {"fedavg": 0.7, "fedprox": 0.74}},
                        tmp_path / "grouped.png", "AUC", title="arms"),
        plots.plot_reliability({"model": (y, p, None)}, tmp_path / "rel.png", title="one model"),
        plots.plot_reliability({"a": (y, p, None), "b": (y, np.clip(p * 0.5, 0, 1), np.ones_like(y, bool))},
                               tmp_path / "rel2.png"),
    ]
    for path in out:
        assert path.exists() and path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
