"""Per-round checkpoint of the federated run, so a restarted ServerApp resumes instead of starting over.

Layout in `<output_dir>/checkpoint/`:
  state.json                    round done, settings fingerprint, history, best round, file names
  global-rNNNN.safetensors      global weights after round NNNN
  best-rNNNN.safetensors        weights of the best round so far (train.select_on)
  strategy-rNNNN.safetensors    server-optimiser state (FedAdam/FedYogi/FedAvgM), when there is any

Tensor files are named by round and written first; state.json is replaced atomically last and names the
files it belongs to. A crash at any point leaves the previous state.json pointing at complete files.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from common.fileio import write_atomic, write_json

log = logging.getLogger(__name__)
STATE_FILE = "state.json"


@dataclass
class RunState:
    fingerprint: str
    rounds_done: int = 0
    history: list[dict] = field(default_factory=list)
    best_round: int = 0
    best_key: list[float] = field(default_factory=list)   # common.training.selection_key of the best round
    best_thresholds: list[float] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)      # {"validation": ..., "test": ...} of the best round
    nodes: dict[str, dict] = field(default_factory=dict)   # site -> {"node_ids", "rounds", "examples"}
    run_ids: list[int] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)    # "global" / "best" / "strategy" -> file name


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # np.ascontiguousarray alone turns a 0-d array (num_batches_tracked) into shape (1,): keep the shape
    clean = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}
    write_atomic(path, lambda tmp: save_file(clean, tmp))


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arr.numpy() for k, arr in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


class Checkpoint:
    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir) / "checkpoint"

    def load(self, fingerprint: str, num_rounds: int) -> tuple[RunState, dict, dict | None, dict] | None:
        """(state, global arrays, best arrays, strategy state) to resume from, or None to start fresh."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = RunState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            log.warning("ignoring unreadable checkpoint %s (%s); starting fresh", path, e)
            return None
        if state.fingerprint != fingerprint:
            log.warning("checkpoint in %s is from a run with other settings; starting fresh", self.dir)
            return None
        if state.rounds_done >= num_rounds or state.rounds_done == 0:
            return None
        glob = _load_arrays(self.dir / state.files["global"])
        best = _load_arrays(self.dir / state.files["best"]) if state.files.get("best") else None
        strat = _load_arrays(self.dir / state.files["strategy"]) if state.files.get("strategy") else {}
        return state, glob, best, strat

    def save(self, state: RunState, global_arrays: dict, best_arrays: dict | None, strategy_state: dict,
             best_changed: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        r = state.rounds_done
        files = dict(state.files)
        files["global"] = f"global-r{r:04d}.safetensors"
        _save_arrays(self.dir / files["global"], global_arrays)
        if best_arrays is not None and (best_changed or not files.get("best")):
            files["best"] = f"best-r{r:04d}.safetensors"
            _save_arrays(self.dir / files["best"], best_arrays)
        if strategy_state:
            files["strategy"] = f"strategy-r{r:04d}.safetensors"
            _save_arrays(self.dir / files["strategy"], strategy_state)
        state.files = files
        write_json(self.dir / STATE_FILE, asdict(state))
        keep = set(files.values()) | {STATE_FILE}
        for old in self.dir.glob("*.safetensors"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                if f.is_file():
                    f.unlink()
