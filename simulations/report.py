"""report.md with embedded PNG plots, written from results.json and the stored predictions only, so a
resumed or re-reported experiment gives the same report. Numbers are printed with three decimals from the
very values in results.json (a test reads them back and compares).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.metrics import ECE_BINS, HEADLINE, SEED_PAPER, SEED_PAPER_NAME, trivial_baseline
from common.plots import plot_bars, plot_reliability, plot_roc_curves, plot_series
from common.tracking import MLRUNS, local_store_uri
from common.training import SELECTION_FIGURE, SELECTION_RULES, selection_key
from simulations.store import REPORT_FILE, ResultStore, write_atomic

HEAD_NAMES = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1", "auc": "Macro AUC"}
MAX_TABLE_HOSPITALS = 12


def natural(name: str) -> list:
    """hospital_2 before hospital_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def fmt(v) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def done_arms(part: dict) -> dict[str, dict]:
    return {k: v for k, v in part["arms"].items() if v.get("status") == "done"}


def seed_of(arm: dict) -> int | None:
    return (arm.get("spec") or {}).get("seed")


def same_seed(refs: list[dict], arm: dict | None, *, fallback: bool = False) -> dict | None:
    """The replicate among `refs` trained with `arm`'s seed (the pairing of every Δ in the report); with
    `fallback`, the first of them when none was."""
    seed = seed_of(arm or {})
    return next((r for r in refs if seed_of(r) == seed), refs[0] if refs and fallback else None)


def centralised_group(groups: dict[str, list[dict]]) -> list[dict] | None:
    """The centralised arm's replicates among replicate_groups(), the reference every gap is paired against."""
    return next((g for g in groups.values() if g[0]["kind"] == "centralised"), None)


def has_replicates(groups: dict[str, list[dict]]) -> bool:
    """Some arm ran more than one train seed: the over-seeds tables have something to show."""
    return any(len(g) > 1 for g in groups.values())


def reference(arms: dict[str, dict], arm: dict | None = None) -> dict | None:
    """The centralised arm an arm is compared with: the replicate of the arm's own train seed when there is one."""
    return same_seed([a for a in arms.values() if a["kind"] == "centralised"], arm, fallback=True)


def describe_arm(a: dict) -> str:
    spec = a.get("spec", {})
    what = {"centralised": "pooled training images", "local": "each hospital alone",
            "federated": f"Flower {spec.get('strategy', '')}", "dp": f"Flower {spec.get('strategy', '')} + DP-SGD",
            "warm-start": "the warm start alone, trained on the public slice (no hospital's data, no federation)"}
    text = f"{what.get(a['kind'], a['kind'])}; {a['cost']['schedule']}"
    if spec.get("warm_start") and a["kind"] != "warm-start":
        text += "; starts from the warm start (GroupNorm network)"
    if spec.get("seed") is not None:
        text += f"; train seed {spec['seed']}"
    if spec.get("params"):
        text += "; " + ", ".join(f"{k}={v}" for k, v in spec["params"].items())
    if spec.get("epsilons") and a["kind"] == "dp":
        text += f"; target ε {spec['epsilons'][0]:g}"
    return text


def headline_table(arms: dict[str, dict], compare_paper: bool = False) -> list[str]:
    """The five headline metrics (macro over findings) + macro ECE (calibration: where DP and federated models
    drift while AUC holds) + macro AUC/F1/ECE CIs + gap to centralised, one row per arm, then the all-positive
    baseline on the same test images and, only when asked (`compare_paper`), the seed paper's reported
    ChestX-ray14 figures (neither has an ECE: the paper reports none, the baseline is a decision rule)."""
    cols = [HEAD_NAMES[k] for k in HEADLINE] + ["ECE", "AUC 95% CI", "F1 95% CI", "ECE 95% CI",
                                                "Δ AUC vs centralised", "best round"]
    tail = " |" * (len(cols) - len(HEADLINE) + 1)  # close a reference row's fifth figure, then its empty cells
    lines = ["| Arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, a in arms.items():
        h, ci = a["test"]["headline"], a["test"].get("headline_ci") or {}
        if a["kind"] == "local":
            rng = a["test"].get("range") or {}
            ci = {"auc": rng.get("auc"), "f1": rng.get("f1"), "ece": rng.get("ece")}
        ref = reference(arms, a)   # the same seed's centralised arm
        ref_auc = ref["test"]["headline"]["auc"] if ref else None
        gap = (h["auc"] - ref_auc) if (ref_auc is not None and h.get("auc") is not None
                                       and a["kind"] != "centralised") else None
        label = f"{name} (mean of {a['test'].get('n_models')} hospitals; range)" if a["kind"] == "local" else name
        cells = [fmt(h.get(k)) for k in HEADLINE] + [fmt(h.get("ece")), fmt_ci(ci.get("auc")), fmt_ci(ci.get("f1")),
                                                     fmt_ci(ci.get("ece")), "" if gap is None else f"{gap:+.3f}",
                                                     str(a.get("best_round") or "")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base = trivial_baseline(next(iter(arms.values()))["test"]) if arms else None
    if base is not None:
        lines.append("| all-positive baseline | " + " | ".join(fmt(base[k]) for k in HEADLINE) + tail)
    if compare_paper:
        lines.append(f"| {SEED_PAPER_NAME} | " + " | ".join(fmt(SEED_PAPER[k]) for k in HEADLINE) + tail)
    return lines


def gaps(arms: dict[str, dict]) -> list[str]:
    if reference(arms) is None:
        return []
    out = []
    for name, a in arms.items():
        ref = reference(arms, a)   # the same seed's centralised arm
        if a["kind"] in ("federated", "dp", "local") and a["test"]["headline"].get("auc") is not None:
            d = a["test"]["headline"]["auc"] - ref["test"]["headline"]["auc"]
            f1 = (a["test"]["headline"]["f1"] or 0) - (ref["test"]["headline"]["f1"] or 0)
            out.append(f"- **{name} − centralised**: macro AUC {d:+.3f}, F1 {f1:+.3f}")
    return out


def cost_table(arms: dict[str, dict]) -> list[str]:
    lines = ["| Arm | schedule | wall s | s per round (median) | peak MiB (process tree) "
             "| bytes received / client / round | bytes sent / client / round | ε |", "|---" * 8 + "|"]
    for name, a in arms.items():
        rows = a.get("rounds") or []
        per_round = np.median([r["wall_s"] for r in rows if r.get("wall_s") is not None]) if rows else None
        clients = [c for r in rows for c in (r.get("clients") or {}).values()]
        recv = np.mean([c["bytes_received"] for c in clients if c.get("bytes_received")]) if clients else None
        sent = np.mean([c["bytes_sent"] for c in clients if c.get("bytes_sent")]) if clients else None
        lines.append(f"| {name} | {a['cost']['schedule']} | {a['wall_s']:.1f} | "
                     f"{'' if per_round is None else f'{per_round:.2f}'} | {a.get('peak_rss_mb', '')} | "
                     f"{'' if recv is None else f'{recv:,.0f}'} | {'' if sent is None else f'{sent:,.0f}'} | "
                     f"{fmt(a.get('epsilon')) if a.get('epsilon') is not None else ''} |")
    return lines


def cross_site(arms: dict[str, dict]) -> tuple[list[str], list[str], np.ndarray]:
    """Rows: every model (global arms + each local-only hospital model); columns: hospital test splits."""
    rows: dict[str, dict] = {}
    for a in arms.values():
        for model, row in (a.get("cross_site") or {}).items():
            rows[model if a["kind"] != "local" else f"local: {model}"] = row
    cols = sorted({h for r in rows.values() for h in r}, key=natural)
    mat = np.array([[np.nan if (r.get(c) or {}).get("auc") is None else r[c]["auc"] for c in cols]
                    for r in rows.values()], dtype=float).reshape(len(rows), len(cols))
    return list(rows), cols, mat


def _heatmap(names: list[str], cols: list[str], mat: np.ndarray, path: Path) -> Path:
    fig = Figure(figsize=(max(6, 0.35 * len(cols) + 3), max(4, 0.3 * len(names) + 2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(mat, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize="small")
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ax.set(xlabel="hospital test split", title="Cross-site macro AUC")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plots(out: Path, pname: str, arms: dict[str, dict], store: ResultStore, findings: list[str]) -> list[str]:
    d = out / "plots" / pname
    md = []
    series = {n: [(r["round"], r["test_auc"]) for r in a.get("rounds", []) if r.get("test_auc") is not None]
              for n, a in arms.items()}
    plot_series(series, d / "auc_per_round.png", "round (centralised/local-only: epoch)", "global test macro AUC",
                title=f"AUC per round [{pname}]")
    md.append(f"![AUC per round](plots/{pname}/auc_per_round.png)")
    bars = {}
    for n, a in arms.items():
        for h, m in (a.get("per_hospital_test") or {}).items():
            if m and m.get("auc") is not None:
                bars.setdefault(h, {})[n] = m["auc"]
    if bars:
        plot_bars(bars, d / "per_hospital_auc.png", "macro AUC on the hospital's own test split",
                  title=f"Per-hospital AUC [{pname}] (local-only: each hospital's own model)")
        md.append(f"![Per-hospital AUC](plots/{pname}/per_hospital_auc.png)")
    calibration = {}
    for n in arms:
        pred = store.predictions(pname, n)
        if pred is not None and len(pred["labels"]):
            plot_roc_curves(pred["labels"], pred["probs"], findings, d / f"roc_{n}.png", mask=pred["mask"],
                            title=f"ROC, global test [{pname} / {n}]")
            md.append(f"![ROC {n}](plots/{pname}/roc_{n}.png)")
            calibration[n] = (pred["labels"], pred["probs"], pred["mask"])
    if calibration:
        plot_reliability(calibration, d / "reliability.png",
                         title=f"Reliability, global test, all findings pooled [{pname}]")
        md.append(f"![Reliability](plots/{pname}/reliability.png)")
    return md


def partition_plot(out: Path, pname: str, partition: dict) -> str:
    counts = {h: {"no finding": s["train"]["no_finding"], **s["train"]["positives"]}
              for h, s in partition["hospitals"].items()}
    plot_bars(counts, out / "plots" / pname / "partition.png", "training images",
              title=f"What each hospital holds [{pname}]: train-split labels")
    return f"![Partition label histogram](plots/{pname}/partition.png)"


def replicate_groups(arms: dict[str, dict]) -> dict[str, list[dict]]:
    """Arms by name without their seed (`seeds` expansion): {base name: [replicates]}."""
    out: dict[str, list[dict]] = {}
    for name, a in arms.items():
        out.setdefault((a.get("spec") or {}).get("group") or name, []).append(a)
    return out


def _auc(a: dict) -> float | None:
    return a["test"]["headline"].get("auc")


def _ece(a: dict) -> float | None:
    return (a["test"].get("macro") or {}).get("ece")


def mean_sd(values) -> tuple[float | None, float | None, int]:
    """(mean, sample sd or None for one value, n) of the values that are not None."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


def fmt_mean_sd(values) -> str:
    m, sd, n = mean_sd(values)
    return "n/a" if m is None else f"{m:.3f}" if sd is None else f"{m:.3f} ± {sd:.3f}"


def paired_gaps(group: list[dict], ref: list[dict] | None, value=None) -> list[float]:
    """value(arm) − value(the reference's replicate of the same seed), test AUC by default, for every pair where
    both are known."""
    value = value or _auc
    pairs = [(value(a), value(r)) for a in group if (r := same_seed(ref or [], a)) is not None]
    return [x - y for x, y in pairs if x is not None and y is not None]


def seeds_table(arms: dict[str, dict]) -> list[str]:
    """Mean ± sd over train seeds of every arm with replicates; the gap to centralised is paired by seed."""
    groups = replicate_groups(arms)
    if not has_replicates(groups):
        return []
    ref = centralised_group(groups)
    lines = ["| Arm | seeds | Macro AUC | F1 | ECE | ε spent | Δ AUC vs centralised (paired by seed) |",
             "|---" * 7 + "|"]
    for name, g in groups.items():
        gap = paired_gaps(g, ref) if g is not ref else []
        eps = [a.get("epsilon") for a in g]
        lines.append(f"| {name} | {len(g)} | {fmt_mean_sd(_auc(a) for a in g)} | "
                     f"{fmt_mean_sd(a['test']['headline'].get('f1') for a in g)} | {fmt_mean_sd(_ece(a) for a in g)} | "
                     f"{fmt_mean_sd(eps) if any(e is not None for e in eps) else ''} | "
                     f"{fmt_mean_sd(gap) if gap else ''} |")
    return ["### Over seeds (mean ± sd)", ""] + lines + [""]


def kept_round(rounds: list[dict], rule: str) -> dict | None:
    """The round (epoch) `rule` would have kept, by the very `selection_key` training uses (the first of equals,
    as training keeps it); None when a round lacks the figure the rule needs or its test AUC."""
    need = SELECTION_FIGURE[rule]
    if not rounds or any(r.get(need) is None or r.get("test_auc") is None for r in rounds):
        return None
    return max(rounds, key=lambda r: selection_key(rule, r.get("val_f1"), r.get("val_auc"), r.get("val_loss")))


def selection_table(arms: dict[str, dict]) -> list[str]:
    """How much the rule that keeps a round moves each arm's test AUC and its gap to centralised: every rule
    applied to the per-round validation figures the arm recorded, the test AUC of its pick beside it (the
    test split chose nothing; the arm's own rule is the one its headline used). With train seeds only."""
    groups = replicate_groups(arms)
    if not has_replicates(groups):
        return []

    def test_auc(a: dict, rule: str) -> float | None:
        r = kept_round(a.get("rounds") or [], rule)
        return None if r is None else r["test_auc"]

    ref = centralised_group(groups)
    if not any(test_auc(a, rule) is not None for g in groups.values() for a in g for rule in SELECTION_RULES):
        return []
    lines = ["| Arm | seeds | " + " | ".join(f"kept on {rule}: AUC (Δ vs centralised)" for rule in SELECTION_RULES)
             + " |", "|---" * (2 + len(SELECTION_RULES)) + "|"]
    for name, g in groups.items():
        cells = []
        for rule in SELECTION_RULES:
            gap = paired_gaps(g, ref, lambda a: test_auc(a, rule)) if g is not ref else []
            cells.append(fmt_mean_sd(test_auc(a, rule) for a in g) + (f" (Δ {fmt_mean_sd(gap)})" if gap else ""))
        lines.append(f"| {name} | {len(g)} | " + " | ".join(cells) + " |")
    return ["### Selection rule (test AUC of the round each rule keeps, mean ± sd over seeds)", "",
            "Read from each arm's per-round validation figures and per-round test AUC (for a federated arm the "
            "server's own, on the same test images); the headline used the arm's `train.select_on`.", ""] + lines + [""]


def dp_recipe(name: str) -> str:
    """A DP arm's recipe (its name without the target ε): one curve per recipe."""
    return re.sub(r"-eps[0-9.e+-]+$", "", name)


def privacy_rows(arms: dict[str, dict]) -> list[dict]:
    """One row per DP recipe and target ε, and one (ε = ∞) per non-DP reference, each over its seeds."""
    groups = replicate_groups(arms)
    rows = []
    for name, g in groups.items():
        if g[0]["kind"] != "dp":
            continue
        spec = g[0].get("spec") or {}
        ref_name = spec.get("reference") or "fedavg"
        ref = groups.get(ref_name)
        auc, sd, n = mean_sd(_auc(a) for a in g)
        rows.append({"recipe": dp_recipe(name), "arm": name, "target": (spec.get("epsilons") or [None])[0],
                     "spent": mean_sd(a.get("epsilon") for a in g)[0], "auc": auc, "sd": sd, "n": n,
                     "ece": mean_sd(_ece(a) for a in g)[0], "reference": ref_name if ref else None,
                     "gap": mean_sd(paired_gaps(g, ref))[0] if ref else None})
    refs = list(dict.fromkeys(r["reference"] for r in rows if r["reference"]))
    if rows:   # the warm start alone spends nothing of any hospital's budget: ε = 0
        refs += [n for n, g in groups.items() if g[0]["kind"] == "warm-start"]
    for ref_name in refs:
        g = groups[ref_name]
        auc, sd, n = mean_sd(_auc(a) for a in g)
        zero = g[0]["kind"] == "warm-start"
        rows.append({"recipe": ref_name, "arm": ref_name, "target": None, "spent": 0.0 if zero else None,
                     "auc": auc, "sd": sd, "n": n, "ece": mean_sd(_ece(a) for a in g)[0], "reference": None,
                     "gap": None, "no_hospital_data": zero})
    return rows


def privacy_table(arms: dict[str, dict]) -> list[str]:
    rows = privacy_rows(arms)
    if not rows:
        return []
    lines = ["| recipe | target ε | ε spent | seeds | Macro AUC (mean ± sd) | ECE | reference (no DP) | Δ AUC vs reference |",
             "|---" * 8 + "|"]
    for r in rows:
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}" + (f" ± {r['sd']:.3f}" if r["sd"] is not None else "")
        target = "0 (no hospital data)" if r.get("no_hospital_data") else "∞" if r["target"] is None else f"{r['target']:g}"
        spent = "∞" if r["spent"] is None else fmt(r["spent"])
        gap = "" if r["gap"] is None else f"{r['gap']:+.3f}"
        lines.append(f"| {r['recipe']} | {target} | {spent} | {r['n']} | {auc} | {fmt(r['ece'])} | "
                     f"{r['reference'] or ''} | {gap} |")
    return ["### Privacy-utility (DP-SGD at each hospital)", ""] + lines + [""]


def privacy_utility(out: Path, results: dict) -> list[str]:
    """Test AUC against the ε each DP recipe spent (mean ± sd over seeds), its non-DP reference as a flat line."""
    series: dict[str, list] = {}
    for pname, part in results["partitions"].items():
        rows = privacy_rows(done_arms(part))
        dp = [r for r in rows if r["target"] is not None and r["spent"] is not None and r["auc"] is not None]
        if not dp:
            continue
        for recipe in dict.fromkeys(r["recipe"] for r in dp):
            series[f"{recipe} [{pname}]"] = sorted((r["spent"], r["auc"], r["sd"]) for r in dp if r["recipe"] == recipe)
        lo, hi = min(r["spent"] for r in dp), max(r["spent"] for r in dp)
        for r in rows:
            if r["target"] is None and r["auc"] is not None:
                what = "alone (ε = 0: no hospital data)" if r.get("no_hospital_data") else "no DP"
                series[f"{r['recipe']}, {what} [{pname}]"] = [(lo, r["auc"]), (hi, r["auc"])]
    if not series:
        return []
    plot_series(series, out / "plots" / "privacy_utility.png", "ε spent (δ as configured)", "global test macro AUC",
                title="Privacy-utility (mean ± sd over seeds)")
    return ["## Privacy-utility", "", "![Privacy-utility](plots/privacy_utility.png)", ""]


def write_report(out: Path, results: dict, store: ResultStore) -> Path:
    cfg = results["config"]
    lines = [f"# Simulation report: {results['experiment']}", "",
             f"Data: `{cfg['data']['source']}` at `{cfg['data']['path']}`; model `{cfg['model']['arch']}` "
             f"(weights {cfg['model']['weights']}) at {cfg['preprocess']['image_size']} px; batch "
             f"{cfg['train']['batch_size']}, lr {cfg['train']['lr']}; partition seed {cfg['seed']}, training seed "
             f"{cfg['train']['seed']}.", "",
             f"**Protocol.** {results['protocol']}.", "", f"**Cost.** {results['cost']['statement']}", "",
             "Metrics: accuracy, precision, recall, F1, AUC and expected calibration error (ECE: equal-width "
             f"probability bins, {ECE_BINS} of them; 0 = calibrated) macro-averaged over findings on the one global "
             "test set (the reliability diagrams pool every finding's labelled entries); "
             + (f"95% CIs from {cfg['bootstrap']} bootstrap resamples of the test images" if cfg["bootstrap"]
                else "no CIs (bootstrap = 0)")
             + "; thresholds tuned on the validation set each arm selects with (global validation; local-only: "
             "the hospital's own).", ""]
    for pname, part in results["partitions"].items():
        arms = done_arms(part)
        pfile = out / part["partition_file"]
        partition = json.loads(pfile.read_text()) if pfile.is_file() else None
        n_h = len(partition["hospitals"]) if partition else next(
            (a.get("hospitals_n") for a in arms.values()), "?")
        lines += [f"## Partition `{pname}` ({n_h} hospitals)", ""]
        if partition:
            g = partition["global"]
            lines += [f"Global validation {g['val']['images']} images, global test {g['test']['images']} images. "
                      f"Partition saved in `{part['partition_file']}` (sample keys and patients of every split).", ""]
        if arms:
            lines += ["### Arms", ""] + [f"- **{n}**: {describe_arm(a)}" for n, a in arms.items()] + [""]
            lines += ["### Headline (global test set)", ""] + headline_table(arms, cfg.get("compare_paper", False)) + [""] + gaps(arms) + [""]
            lines += seeds_table(arms) + selection_table(arms) + privacy_table(arms)
            findings = partition["findings"] if partition else []
            lines += ["### Plots", ""] + plots(out, pname, arms, store, findings) + [""]
            names, cols, mat = cross_site(arms)
            if names:
                lines += ["### Cross-site matrix (macro AUC; rows: model, columns: hospital test split)", ""]
                if len(cols) <= MAX_TABLE_HOSPITALS:
                    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
                    lines += [f"| {n} | " + " | ".join(fmt(None if np.isnan(v) else v) for v in row) + " |"
                              for n, row in zip(names, mat, strict=True)]
                else:
                    lines.append(f"{len(cols)} hospitals: see the heatmap; every value is in results.json "
                                 "(cross_site).")
                _heatmap(names, cols, mat, out / "plots" / pname / "cross_site.png")
                lines += ["", f"![Cross-site matrix](plots/{pname}/cross_site.png)", ""]
            lines += ["### Cost, time, memory and communication", ""] + cost_table(arms) + [""]
        if partition:
            lines += [partition_plot(out, pname, partition), ""]
        others = {n: a for n, a in part["arms"].items() if a.get("status") != "done"}
        if others:
            lines += ["### Arms not run", ""] + [f"- {n}: {a['status']}: {a.get('reason') or 'not finished'}"
                                                   for n, a in others.items()] + [""]
    lines += privacy_utility(out, results)
    lines += ["TensorBoard: `tensorboard --logdir " + str(out / "tensorboard") + "`", ""]
    if (out / MLRUNS).is_dir():
        lines += ["MLflow: `mlflow ui --backend-store-uri " + local_store_uri(out) + "`", ""]
    return write_atomic(out / REPORT_FILE, "\n".join(lines))
