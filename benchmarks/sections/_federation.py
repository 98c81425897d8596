"""What the sections that run whole federations share: a small demo-profile run, and each simulation in a
fresh interpreter (its own peak memory, torch threads and Ray runtime; nothing carried over between runs).

Not a section (the leading underscore keeps it out of `benchmarks.suite.sections()`).
"""
from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.suite import REPO

# the demo profile made small: training takes little of a round, so what a round costs beside it shows
SMALL = {"federation.local_epochs": 1, "federation.resume": False, "preprocess.image_size": 32,
         "preprocess.denoise_sigma": 0.0, "augment.enabled": False, "train.batch_size": 8,
         "federation.min_available_nodes": 3, "federation.min_train_nodes": 3, "federation.min_evaluate_nodes": 3}


def small_settings(data: str, out: str, rounds: int, overrides: dict | None = None):
    """The demo profile with SMALL, `rounds` rounds on `data`, writing to `out`, then `overrides` (dotted keys)."""
    from common.settings import Settings

    return Settings.build("demo", {"data.path": data, "output_dir": out, "federation.rounds": rounds, **SMALL,
                                   **(overrides or {})})


def fresh(module: str, *args: str, what: str) -> dict:
    """`python -m <module> --sim-worker <args>` from the repository root; the JSON its last stdout line prints.
    Its log (stderr) goes to this terminal; `what` names the run in the error if it fails."""
    proc = subprocess.run([sys.executable, "-m", module, "--sim-worker", *args], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the federated simulation ({what}) failed; its log is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])
