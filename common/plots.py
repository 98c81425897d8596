"""PNG figures for reports, the model card and the simulations.

Uses matplotlib's object-oriented API on an Agg canvas (no pyplot, no global figure registry, no display),
so it is safe in headless servers and threads; each figure is closed (its canvas dropped) after saving.
Every function writes one PNG, creating parent folders, and returns its Path.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from common.metrics import ECE_BINS, _prepare, reliability_data


def _figure(width: float = 7.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    fig.clear()  # "close": free the artists; the figure was never registered with pyplot
    return path


def _grouped_bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """Bars for each series side by side within each group; None/NaN values leave a gap."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, (label, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else float(a) for a in vals])
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=label)
    ax.set_xticks(x, list(groups), rotation=45 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    if len(series) > 1:
        ax.legend(fontsize="small")


def plot_roc_curves(y_true, y_prob, findings, path, mask=None, title=None) -> Path:
    """One ROC curve per finding, AUC in the legend; findings lacking a class (AUC undefined) are skipped."""
    y_true, y_prob, m = _prepare(y_true, y_prob, mask)
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    drawn = 0
    for j, name in enumerate(findings):
        y, p = y_true[m[:, j], j], y_prob[m[:, j], j]
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color=cmap((2 * j + j // 10) % 20),  # 10 distinct hues, then their light shades
                lw=1.5, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    if drawn:
        ax.legend(fontsize="small", loc="lower right")
    else:
        ax.text(0.5, 0.5, "no finding has both classes", ha="center", va="center")
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01), title=title or "ROC curves")
    return _save(fig, path)


def plot_reliability(models: Mapping[str, tuple], path, finding: int | None = None, title=None,
                     n_bins: int = ECE_BINS) -> Path:
    """Reliability diagram: fraction positive against mean predicted probability per equal-width bin, one line
    per model ({name: (y_true, y_prob, mask)}), the diagonal (perfect calibration), ECE in the legend, and the
    bin counts below (a bin of 3 images says little). `finding`: a column index, or None to pool every finding's
    labelled entries (the legend's ECE is then the pooled one, compute_metrics' micro ECE)."""
    fig = _figure(7, 7)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    cmap = matplotlib.colormaps["tab10"]
    width = 1.0 / n_bins
    drawn = 0
    for i, (name, (y, p, mask)) in enumerate(models.items()):
        d = reliability_data(y, p, mask=mask, finding=finding, n_bins=n_bins)
        if not d["n"]:
            continue
        full = [b for b, c in enumerate(d["counts"]) if c]
        color = cmap(i % 10)
        ax.plot([d["mean_prob"][b] for b in full], [d["frac_pos"][b] for b in full], marker="o", ms=4, lw=1.5,
                color=color, label=f"{name} ({'pooled ' if finding is None else ''}ECE {d['ece']:.3f})")
        left = np.asarray(d["edges"][:-1]) + width * (0.1 + 0.8 * i / len(models))
        hist.bar(left, d["counts"], width * 0.8 / len(models), align="edge", color=color, alpha=0.8)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no labelled cases", ha="center", va="center")
    ax.legend(fontsize="small", loc="upper left")
    ax.set(ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1.01), title=title or "Reliability diagram")
    ax.grid(alpha=0.3)
    hist.set(xlabel="mean predicted probability (bin)", ylabel="images per bin", xlim=(0, 1))
    hist.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_per_finding_bars(metrics: Mapping, path, keys=("auc", "f1", "recall", "specificity")) -> Path:
    """Grouped bars per finding (plus macro) for the given compute_metrics() keys."""
    names = list(metrics["per_finding"]) + (["macro"] if "macro" in metrics else [])
    rows = [metrics["per_finding"][n] for n in metrics["per_finding"]] + ([metrics["macro"]] if "macro" in metrics else [])
    fig = _figure(max(7.0, 1 + 0.25 * len(names) * len(keys)), 5)
    ax = fig.add_subplot()
    _grouped_bars(ax, names, {k: [r.get(k) for r in rows] for k in keys})
    ax.set(ylim=(0, 1.05), ylabel="score", title="Per-finding metrics")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping], path,
                         keys=("train_loss", "val_loss", "val_auc", "val_f1")) -> Path:
    """Losses (left) and metrics (right) against "epoch" or "round" (else the entry index); absent keys skipped."""
    xkey = next((k for k in ("epoch", "round") if any(k in h for h in history)), None)
    present = [k for k in keys if any(h.get(k) is not None for h in history)]
    panels = [[k for k in present if "loss" in k], [k for k in present if "loss" not in k]]
    panels = [p for p in panels if p] or [[]]
    fig = _figure(6 * len(panels), 4.5)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in panel:
            pts = [(h.get(xkey, n + 1) if xkey else n + 1, h[k]) for n, h in enumerate(history) if h.get(k) is not None]
            ax.plot(*zip(*pts), marker="o", ms=3, label=k)
        if panel:
            ax.legend(fontsize="small")
        ax.set(xlabel=xkey or "step", ylabel="loss" if panel and "loss" in panel[0] else "value")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_series(series: Mapping[str, Sequence[tuple[float, float]]], path, xlabel, ylabel, title=None) -> Path:
    """Generic lines, one per named series of (x, y) points, e.g. AUC per round per arm; (x, y, err) points get
    error bars (e.g. ± sd over seeds)."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, pts in series.items():
        if not len(pts):
            continue
        cols = list(zip(*pts))
        if len(cols) == 3:
            ax.errorbar(cols[0], cols[1], yerr=[e or 0 for e in cols[2]], marker="o", ms=3, capsize=3, label=label)
        else:
            ax.plot(cols[0], cols[1], marker="o", ms=3, label=label)
    if series:
        ax.legend(fontsize="small")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(values: Mapping[str, float | Mapping[str, float]], path, ylabel, title=None) -> Path:
    """Simple bars ({name: value}, values labelled) or grouped bars ({group: {series: value}})."""
    fig = _figure()
    ax = fig.add_subplot()
    groups = list(values)
    if any(isinstance(v, Mapping) for v in values.values()):
        series_names = list(dict.fromkeys(s for v in values.values() if isinstance(v, Mapping) for s in v))
        as_map = {g: (v if isinstance(v, Mapping) else {ylabel: v}) for g, v in values.items()}
        series_names += [ylabel] if any(not isinstance(v, Mapping) for v in values.values()) else []
        _grouped_bars(ax, groups, {s: [as_map[g].get(s) for g in groups] for s in series_names})
    else:
        bars = ax.bar(groups, [float(v) for v in values.values()])
        ax.bar_label(bars, fmt="%.3g", fontsize="small")
        if len(groups) > 4:
            ax.tick_params(axis="x", labelrotation=45)
    ax.set(ylabel=ylabel, title=title or "")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_heatmap(values: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], path,
                 title=None, labels: Sequence[Sequence[str]] | None = None, vmin: float = 0.0,
                 vmax: float = 1.0) -> Path:
    """A rows x cols matrix (e.g. model x hospital AUC) coloured on [vmin, vmax]; None/NaN cells are grey and
    show `labels` (e.g. a hospital's failure code), the others their value."""
    v = np.array([[np.nan if x is None else float(x) for x in row] for row in values], dtype=float).reshape(
        len(rows), len(cols))
    fig = _figure(max(5.0, 1.6 + 1.1 * len(cols)), max(2.5, 1.2 + 0.6 * len(rows)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            text = labels[i][j] if labels is not None else ("n/a" if np.isnan(v[i, j]) else f"{v[i, j]:.3f}")
            dark = not np.isnan(v[i, j]) and (v[i, j] - vmin) / ((vmax - vmin) or 1) < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize="small", color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), list(cols), rotation=30 if len(cols) > 3 else 0,
                  ha="right" if len(cols) > 3 else "center")
    ax.set_yticks(range(len(rows)), list(rows))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title or "")
    return _save(fig, path)


__all__ = ("plot_roc_curves", "plot_reliability", "plot_per_finding_bars", "plot_training_curves", "plot_series", "plot_bars",
           "plot_heatmap")
