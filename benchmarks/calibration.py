"""Calibration of the exported federated models: test ECE as trained, temperature-scaled and Platt-scaled.

    .venv/bin/python benchmarks/calibration.py runs/simulations/pneumoniamnist-fedavg-gap

Reads the bundles a finished simulation's federated arms exported (<run>/work/<partition>/<arm>/flower/bundle).
For each one it builds the server's own evaluator from the run's settings (server.evaluation.GlobalEvaluator:
the same validation and test split the ServerApp used), then applies common.calibration.calibrate with each
method, as `train.calibration` would at export. It prints per-arm rows and a table of test ECE, the largest AUC
change, and test F1 at the tuned thresholds.

A bundle exported with calibration on is calibrated again here, which is what its `as trained` column shows, so
point it at runs made with `train.calibration = "none"` or before that setting existed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import table  # noqa: E402

METHODS = ("temperature", "platt")


def score(run: Path) -> list[dict]:
    from common.arrays import state_to_record
    from common.bundle import load_bundle
    from common.calibration import calibrate
    from common.settings import Settings
    from server.evaluation import GlobalEvaluator

    rows = []
    for fj in sorted(run.glob("work/*/*/flower/federation.json")):
        s = Settings.model_validate(json.loads(fj.read_text())["provenance"]["config"])
        ev = GlobalEvaluator(s)
        row = {"partition": fj.parts[-4], "arm": fj.parts[-3],
               "as trained": ev(0, state_to_record(load_bundle(fj.parent / "bundle").model), s.train.threshold_method)}
        for method in METHODS:
            model = load_bundle(fj.parent / "bundle").model
            row[method + " fit"] = calibrate(model, ev.loaders["val"], ev.findings, ev.multilabel, method)
            row[method] = ev(0, state_to_record(model), s.train.threshold_method)
        rows.append(row)
        print(f"{row['partition']} {row['arm']}: " + "  ".join(
            f"{k} AUC {row[k].test['macro']['auc']:.4f} ECE val {row[k].val['macro']['ece']:.3f} "
            f"test {row[k].test['macro']['ece']:.3f}" for k in ("as trained", *METHODS)), flush=True)
    return rows


def summary_table(rows: list[dict]) -> str:
    out = []
    for part in sorted({r["partition"] for r in rows}):
        g = [r for r in rows if r["partition"] == part]

        def ece(k):
            v = [r[k].test["macro"]["ece"] for r in g]
            return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

        dauc = max(abs(r[k].test["macro"]["auc"] - r["as trained"].test["macro"]["auc"]) for r in g for k in METHODS)
        f1 = [np.mean([r[k].test["macro"]["f1"] for r in g]) for k in ("as trained", "platt")]
        out.append([part, len(g), ece("as trained"), ece("temperature"), ece("platt"), f"{dauc:.1e}",
                    f"{f1[0]:.3f} / {f1[1]:.3f}"])
    return table(["partition", "arms", "test ECE as trained", "temperature", "Platt", "max |Δ AUC|",
                  "test F1 as trained / Platt"], out,
                 title="Federated bundles calibrated on the server's validation split (common.calibration)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished `fedxray simulate` output folder")
    a = p.parse_args(argv)
    rows = score(a.run)
    if not rows:
        sys.exit(f"no federated bundles under {a.run}/work/*/*/flower/: is it a finished `fedxray simulate` run?")
    print()
    print(summary_table(rows))


if __name__ == "__main__":
    main()
