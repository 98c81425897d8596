"""Results on disk: each arm's result is written atomically the moment it finishes, so an interrupted
experiment resumes by skipping arms whose file exists with the same fingerprint (same data, model,
training and arm settings); a changed setting reruns the arm instead of reusing a stale number.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.fileio import jsonable, write_atomic, write_json  # noqa: F401 - re-exported for simulations/

RESULTS_FILE, REPORT_FILE = "results.json", "report.md"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(list(parts)), sort_keys=True).encode()).hexdigest()[:16]


class ResultStore:
    """`<out>/arms/<partition>/<arm>.json` (+ `.npz` test predictions for ROC curves)."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def arm_path(self, partition: str, arm: str, suffix: str = ".json") -> Path:
        return self.out / "arms" / partition / f"{arm}{suffix}"

    def finished(self, partition: str, arm: str, fp: str) -> dict | None:
        """The stored result when this arm already finished with the same fingerprint, else None."""
        p = self.arm_path(partition, arm)
        if not p.is_file():
            return None
        try:
            result = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
        return result if result.get("fingerprint") == fp and result.get("status") == "done" else None

    def save(self, partition: str, arm: str, result: dict, predictions: dict[str, np.ndarray] | None = None) -> None:
        if predictions:   # predictions first: the JSON's presence is what marks the arm finished
            import io
            buf = io.BytesIO()
            np.savez_compressed(buf, **predictions)
            write_atomic(self.arm_path(partition, arm, ".npz"), buf.getvalue())
        write_json(self.arm_path(partition, arm), result)

    def predictions(self, partition: str, arm: str) -> dict[str, np.ndarray] | None:
        p = self.arm_path(partition, arm, ".npz")
        if not p.is_file():
            return None
        with np.load(p) as z:
            return {k: z[k] for k in z.files}
