"""Federated vs centralised vs local-only on real chest X-rays (PneumoniaMNIST), 3 hospitals, IID and
Dirichlet alpha=0.3, at matched cost; then how time per round and peak memory grow from 3 to 50 hospitals.

    .venv/bin/python benchmarks/federated_vs_centralised.py [--rounds 15] [--skip-scale] [--out DIR]

Runs the shipped experiments simulations/experiments/pneumoniamnist.toml and scale50.toml (resumable: a
rerun skips finished arms) and prints the tables. Goal (issue 7): FedAvg within 0.01 test AUC of
centralised on IID and 0.02 on Dirichlet alpha=0.3. Full reports: <out>/*/report.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import SHARED_DATA, table  # noqa: E402

GOALS = {"iid": 0.01, "dirichlet-0.3": 0.02}
DATA = SHARED_DATA / "pneumoniamnist.npz"


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def accuracy_table(results: dict) -> str:
    rows = []
    for pname, part in results["partitions"].items():
        arms = {n: a for n, a in part["arms"].items() if a.get("status") == "done"}
        ref = next((a for a in arms.values() if a["kind"] == "centralised"), None)
        for n, a in arms.items():
            h = a["test"]["headline"]
            ci = (a["test"].get("headline_ci") or {}).get("auc") or (a["test"].get("range") or {}).get("auc")
            gap = h["auc"] - ref["test"]["headline"]["auc"] if ref and a is not ref else None
            goal = ""
            if a["kind"] == "federated" and n == "fedavg" and pname in GOALS and gap is not None:
                goal = f"{'MET' if gap >= -GOALS[pname] else 'MISSED'} (>= -{GOALS[pname]})"
            label = f"{n} (mean of {a['test']['n_models']})" if a["kind"] == "local" else n
            rows.append([pname, label, h["auc"], f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else None, h["f1"],
                         h["accuracy"], None if gap is None else f"{gap:+.3f}", goal,
                         _median([r.get("wall_s") for r in a.get("rounds", [])]), a["wall_s"], a["peak_rss_mb"]])
        for n, a in part["arms"].items():
            if a.get("status") != "done":
                rows.append([pname, n, None, None, None, None, None, a.get("reason") or a["status"], None, None, None])
    return table(["partition", "arm", "test AUC", "AUC 95% CI (local: range)", "F1", "accuracy", "Δ AUC",
                  "goal", "s/round", "wall s", "peak MiB"], rows,
                 title=f"PneumoniaMNIST global test set, 3 hospitals. {results['cost']['statement']}")


def seeds_table(runs: dict[int, dict]) -> str:
    """Test AUC and gap to the same seed's centralised arm, per training seed, with mean and SD over seeds."""
    import statistics

    rows, first = [], next(iter(runs.values()))
    for pname in first["partitions"]:
        for arm in first["partitions"][pname]["arms"]:
            aucs, gaps = [], []
            for res in runs.values():
                arms = res["partitions"][pname]["arms"]
                a, ref = arms.get(arm, {}), arms.get("centralised", {})
                if a.get("status") != "done" or ref.get("status") != "done":
                    continue
                aucs.append(a["test"]["headline"]["auc"])
                gaps.append(aucs[-1] - ref["test"]["headline"]["auc"])
            if not aucs:
                continue
            sd = statistics.stdev(gaps) if len(gaps) > 1 else None
            rows.append([pname, arm, " ".join(f"{x:.3f}" for x in aucs), statistics.mean(aucs),
                         " ".join(f"{g:+.3f}" for g in gaps), f"{statistics.mean(gaps):+.3f}",
                         None if sd is None else f"{sd:.3f}"])
    return table(["partition", "arm", "test AUC per seed", "mean", "Δ AUC per seed", "mean Δ", "SD Δ"], rows,
                 title=f"Training seeds {list(runs)} (same partition; each gap against that seed's centralised arm)")


def scale_table(runs: dict[int, dict]) -> str:
    rows = []
    for n, results in sorted(runs.items()):
        for part in results["partitions"].values():
            for arm, a in part["arms"].items():
                if a.get("status") != "done":
                    continue
                secs = [r.get("wall_s") for r in a.get("rounds", [])]
                rows.append([n, arm, a["test"]["headline"]["auc"], secs[0] if secs else None,
                             _median(secs[1:]) if len(secs) > 1 else None, a["wall_s"], a["peak_rss_mb"]])
    return table(["hospitals", "arm", "test AUC", "round 1 s (incl. start)", "later rounds s (median)", "wall s",
                  "peak MiB (process tree)"], rows,
                 title="Scale: the same 600 synthetic patients (16 px, SmallCNN) split over 3 vs 50 hospitals")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/federated_vs_centralised")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the experiment's)")
    p.add_argument("--arms", default=None, help="comma-separated arm labels (default: all of the experiment)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (train.seed): rerun the arms per "
                   "seed and print the spread, e.g. 42,1,2 (the partition stays the same)")
    p.add_argument("--skip-scale", action="store_true", help="skip the 3 vs 50 hospitals scale runs")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args()
    if not DATA.is_file():
        print(f"error: {DATA} not found: this benchmark needs the workplace's shared data "
              "(see ../shared/data/README.md)", file=sys.stderr)
        return 2
    for k, v in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
                 "FLWR_DISABLE_UPDATE_CHECK": "1"}.items():
        os.environ.setdefault(k, v)
    if not a.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    from common.settings import parse_overrides
    from simulations.config import load_simulation
    from simulations.runner import run_experiment

    out = Path(a.out)
    overrides = {"output_dir": str(out / "pneumoniamnist"), "data.path": str(DATA), **parse_overrides(a.set)}
    if a.rounds:
        overrides["federation.rounds"] = a.rounds
    cfg = load_simulation("pneumoniamnist", overrides)
    if a.arms:
        cfg.arms = [x for x in cfg.arms if x.name in a.arms.split(",")]
    results = run_experiment(cfg, progress=a.progress)
    print(accuracy_table(results))
    print(f"\nreport: {out / 'pneumoniamnist' / 'report.md'}")
    if a.seeds:
        by_seed = {}
        for seed in (int(x) for x in a.seeds.split(",")):
            scfg = cfg if seed == cfg.train.seed else cfg.model_copy(
                update={"output_dir": str(out / f"pneumoniamnist-seed{seed}"),
                        "train": cfg.train.model_copy(update={"train.seed": seed})}, deep=True)
            by_seed[seed] = results if scfg is cfg else run_experiment(scfg, progress=a.progress)
        print()
        print(seeds_table(by_seed))
    if a.skip_scale:
        return 0
    runs = {}
    for n, patients in ((3, 200), (50, 12)):
        scfg = load_simulation("scale50", {"output_dir": str(out / f"scale{n}"), "data.path": f"data/synth-scale{n}",
                                           "synthetic.hospitals": n, "synthetic.patients": patients,
                                           "federation.hospitals": n})
        runs[n] = run_experiment(scfg, progress=a.progress)
    print()
    print(scale_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
