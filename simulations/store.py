"""Results on disk: each arm's result is written atomically the moment it finishes, so an interrupted
experiment resumes by skipping arms whose file exists with the same fingerprint (same data, model,
training and arm settings); a changed setting reruns the arm instead of reusing a stale number.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_FILE, REPORT_FILE = "results.json", "report.md"


def jsonable(x: Any) -> Any:
    """Plain JSON: numpy -> Python, NaN/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Temp file in the same folder, fsync, rename: a reader (or a resumed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


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
