"""Writing results safely: atomic replacement, private file modes, plain JSON. One place for the bundle, the
server's checkpoints and status files, the simulations' result store and the hospitals' privacy ledger.

Files are written owner-only (0600) by default: what fedxray writes holds model weights, patient-level
partitions or a hospital's privacy spending, and sharing it is a decision for whoever owns the folder.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRIVATE = 0o600


def write_atomic(path: str | Path, data: bytes | str | Callable[[str], Any], *, mode: int = PRIVATE) -> Path:
    """Write `data` (bytes, text, or a function that writes the file at the path it is given) through a temp file
    in the same folder, fsync, then os.replace: a reader or a resumed run never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def jsonable(x: Any) -> Any:
    """Plain JSON values: numpy/torch -> Python, Path -> str, tuples/sets -> lists, NaN/inf -> None (e.g. the
    AUC of a finding without positives)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):   # numpy arrays and scalars, torch tensors
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def write_json(path: str | Path, obj: Any, *, mode: int = PRIVATE) -> Path:
    return write_atomic(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n", mode=mode)
