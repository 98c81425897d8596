"""`fedxray simulate`: run (or resume) an experiment and print its tables."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", default=None,
                   help="experiment TOML, or the name of one in simulations/experiments/ (default: the embedded "
                        "synthetic 'default')")
    p.add_argument("--out", default=None, help="output folder (overrides output_dir)")
    p.add_argument("--data", default=None, help="data path (overrides data.path)")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds (all arms' cost follows)")
    p.add_argument("--local-epochs", type=int, default=None, help="federation.local_epochs")
    p.add_argument("--hospitals", type=int, default=None, help="federation.hospitals")
    p.add_argument("--arms", default=None, help="comma-separated arm labels to keep, e.g. centralised,fedavg")
    p.add_argument("--partitions", default=None, help="comma-separated partitions to keep, e.g. iid,dirichlet-0.3")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set model.arch=resnet18 --set federation.client_cpus=2")
    p.add_argument("--report-only", action="store_true", help="rewrite results.json/report.md from finished arms")
    p.add_argument("--list", action="store_true", help="list the shipped experiments and exit")
    p.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress output, only the result")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="federated vs centralised vs local-only on the same splits -> report")
    add_arguments(p)
    p.set_defaults(func=run_command)


def build_config(a):
    from common.settings import parse_overrides
    from simulations.config import load_simulation
    from simulations.protocol import PartitionSpec

    overrides = parse_overrides(a.set)
    for flag, key in ((a.out, "output_dir"), (a.data, "data.path"), (a.rounds, "federation.rounds"),
                      (a.local_epochs, "federation.local_epochs"), (a.hospitals, "federation.hospitals")):
        if flag is not None:
            overrides[key] = flag
    cfg = load_simulation(a.experiment, overrides)
    if a.arms:
        keep = [s.strip() for s in a.arms.split(",")]
        unknown = set(keep) - {x.name for x in cfg.arms}
        if unknown:
            raise SystemExit(f"error: unknown arm(s) {sorted(unknown)}; this experiment has "
                             f"{[x.name for x in cfg.arms]}")
        cfg.arms = [x for x in cfg.arms if x.name in keep]
    if a.partitions:
        keep = [s.strip() for s in a.partitions.split(",")]
        cfg.partitions = [p for p in cfg.partitions
                          if PartitionSpec(p.method, p.alpha, cfg.federation.hospitals).name in keep]
        if not cfg.partitions:
            raise SystemExit(f"error: no partition named {keep} in this experiment")
    return cfg


def run_command(a) -> int:
    from simulations.config import EXPERIMENTS_DIR

    if a.list:
        for f in sorted(EXPERIMENTS_DIR.glob("*.toml")):
            first = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
            print(f"{f.stem:<24} {first}")
        return 0
    cfg = build_config(a)
    if a.report_only:
        from simulations.report import write_report
        from simulations.runner import collect
        from simulations.store import RESULTS_FILE, ResultStore, write_json

        store = ResultStore(Path(cfg.output_dir))
        results = collect(cfg, store, {})
        write_json(Path(cfg.output_dir) / RESULTS_FILE, results)
        path = write_report(Path(cfg.output_dir), results, store)
    else:
        from simulations.runner import run_experiment

        results = run_experiment(cfg, progress=not a.no_progress)
        path = Path(cfg.output_dir) / "report.md"
    print(summary_text(results))
    print(f"\nreport: {path}\nresults: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def summary_text(results: dict) -> str:
    """Console tables: the headline per partition and arm, and each arm's status."""
    from common.metrics import format_headline_table

    out = [results["cost"]["statement"]]
    for pname, part in results["partitions"].items():
        rows = {n: a["test"] for n, a in part["arms"].items() if a.get("status") == "done"}
        out += ["", format_headline_table(rows, title=f"[{pname}] global test set (%)") if rows else f"[{pname}]"]
        for n, a in part["arms"].items():
            if a.get("status") != "done":
                out.append(f"  {n}: {a['status']}: {a.get('reason') or 'not finished'}")
    return "\n".join(out)
