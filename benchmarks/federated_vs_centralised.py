"""Federated vs centralised on real chest X-rays (PneumoniaMNIST), 3 hospitals, IID and Dirichlet alpha=0.3, at
matched cost, over the experiment's train seeds; then how time per round and peak memory grow from 3 to 50
hospitals.

    .venv/bin/python benchmarks/federated_vs_centralised.py [--rounds 15] [--set 'seeds=[1]'] [--skip-scale]

Runs the shipped experiments simulations/experiments/pneumoniamnist-fedavg-gap.toml (FedAvg with a constant
and a cosine client learning rate and with kept Adam moments, FedProx, centralised; seeds 1-5) and scale50.toml
(resumable: a rerun skips finished arms) and prints the tables. Goal (issue 14): the default federation within
0.01 test AUC of centralised on IID and 0.02 on Dirichlet alpha=0.3, mean over seeds of the gap paired by seed.
Full reports (with the selection-rule table): <out>/*/report.md.
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
EXPERIMENT = "pneumoniamnist-fedavg-gap"


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def is_default(spec: dict, defaults) -> bool:
    """Whether an arm trains with the federation the product runs when nothing is set (its params dotted, as in
    the experiment file, or nested, as results.json stores them)."""
    from common.settings import flatten

    params = flatten(spec.get("params") or {})
    return spec.get("strategy") == defaults.strategy and all(
        getattr(defaults, k.split(".", 1)[1], object()) == v for k, v in params.items() if k.startswith("federation."))


def gap_table(results: dict) -> str:
    """Per partition and arm: test AUC and the gap to centralised (paired by seed), mean ± sd over seeds, the
    goal judged on the default federation's mean gap."""
    from common.settings import FederationConfig
    from simulations.report import centralised_group, done_arms, fmt_mean_sd, mean_sd, paired_gaps, replicate_groups

    defaults = FederationConfig()
    rows = []
    for pname, part in results["partitions"].items():
        groups = replicate_groups(done_arms(part))
        ref = centralised_group(groups)
        for name, g in groups.items():
            aucs = [a["test"]["headline"]["auc"] for a in g]
            gap = paired_gaps(g, ref) if g is not ref else []
            default = g[0]["kind"] == "federated" and is_default(g[0].get("spec") or {}, defaults)
            goal = ""
            if default and pname in GOALS and gap:
                goal = f"{'MET' if mean_sd(gap)[0] >= -GOALS[pname] else 'MISSED'} (>= -{GOALS[pname]})"
            rows.append([pname, name + (" (default)" if default else ""), len(g),
                         " ".join(f"{x:.3f}" for x in aucs), fmt_mean_sd(aucs),
                         " ".join(f"{x:+.3f}" for x in gap), fmt_mean_sd(gap) if gap else "", goal,
                         _median([r.get("wall_s") for a in g for r in a.get("rounds", [])]),
                         _median([a["wall_s"] for a in g])])
    return table(["partition", "arm", "seeds", "test AUC per seed", "AUC mean ± sd", "Δ AUC per seed",
                  "Δ mean ± sd", "goal", "s/round", "wall s/arm"], rows,
                 title=f"PneumoniaMNIST global test set, 3 hospitals, Δ against the same seed's centralised arm. "
                       f"{results['cost']['statement']}")


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
    overrides = {"output_dir": str(out / EXPERIMENT), "data.path": str(DATA), **parse_overrides(a.set)}
    if a.rounds:
        overrides["federation.rounds"] = a.rounds
    cfg = load_simulation(EXPERIMENT, overrides)
    if a.arms:
        cfg.arms = [x for x in cfg.arms if x.name in a.arms.split(",")]
    results = run_experiment(cfg, progress=a.progress)
    print(gap_table(results))
    print(f"\nreport: {out / EXPERIMENT / 'report.md'}")
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
