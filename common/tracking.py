"""Run tracking, one place for every run command (`fedxray train`, `federate`, `launch`, `simulate`): per-round
(or per-epoch) metrics to TensorBoard event files, and, when MLflow is installed (`pip install
'fedxray[tracking]'`), an MLflow run with the flattened settings as params, the same metrics and the bundle
as an artifact.

Where MLflow writes: MLFLOW_TRACKING_URI when the user set it (a server, a database: MLflow's own variable,
honoured as MLflow users expect), otherwise a local store in the run's output folder, `<out>/mlruns/`:
`mlflow.db` (SQLite, MLflow 3's default backend; the plain-file `./mlruns` store is in maintenance mode and
refused by MLflow >= 3.7 without an opt-out) and `artifacts/`. Nothing contacts a network unless the user
set the URI. Browse it with `mlflow ui --backend-store-uri sqlite:///<out>/mlruns/mlflow.db`.

Tracking never fails a run: without MLflow one log line says how to enable it; a store that cannot be written
(a read-only folder, a server that is down, after MLflow's own HTTP retries) gives one warning, and the run goes
on untracked. MlflowClient (explicit run ids) rather than the fluent `mlflow.start_run`: no process-wide active
run, so the in-process Flower simulation's threads and nested runs cannot log into each other's run.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MLRUNS = "mlruns"                 # the local store's folder in a run's output folder
EXPERIMENT = "fedxray"            # MLflow experiment unless MLFLOW_EXPERIMENT_NAME says otherwise
ENABLE_HINT = "MLflow is not installed: runs are tracked in TensorBoard only (pip install 'fedxray[tracking]' " \
              "to track params, metrics and the bundle in MLflow)"
PARAM_VALUE_MAX = 6000            # MLflow's limit on a param value (longer ones are cut, with a marker)
_BATCH = 100                      # MLflow's limit on params (and tags) per log_batch call
_hinted = False


def local_store_uri(out: str | Path) -> str:
    """The default backend store of a run folder: SQLite in <out>/mlruns/."""
    return f"sqlite:///{(Path(out).resolve() / MLRUNS / 'mlflow.db')}"


def params_from(nested: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings (`Settings.model_dump(mode="json")`) -> MLflow params: dotted keys, string values
    (unset as ''), each cut to MLflow's value limit."""
    out: dict[str, str] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(params_from(v, key + "."))
            continue
        text = "" if v is None else ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        out[key] = text if len(text) <= PARAM_VALUE_MAX else text[:PARAM_VALUE_MAX - 3] + "..."
    return out


class Tracker:
    """One run's tracking. `out`: the run's output folder (the local MLflow store goes there); `kind`: the job
    (train, federate, simulate: an MLflow tag); `name`: the MLflow run name; `tensorboard`: the folder for
    event files (None: none). Use as a context manager, or call close(); an exception marks the run FAILED."""

    def __init__(self, out: str | Path, *, kind: str, name: str, tensorboard: str | Path | None = None,
                 params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
                 experiment: str | None = None, mlflow: bool = True):
        self.out, self.kind, self.writer = Path(out), kind, None
        self.client = self.run_id = self.uri = None
        if tensorboard is not None:
            self._start_tensorboard(Path(tensorboard))
        if mlflow:
            self._start_mlflow(name, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT,
                               {"fedxray.kind": kind, **(tags or {})})
        if params:
            self.log_params(params)

    # --------------------------------------------------------------------------------------------- start
    def _start_tensorboard(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
            return
        try:
            self.writer = SummaryWriter(log_dir=str(folder))
        except OSError as e:
            log.warning("TensorBoard event files cannot be written to %s (%s): the run goes on without them",
                        folder, e.strerror or e)

    def _start_mlflow(self, name: str, experiment: str, tags: dict[str, Any]) -> None:
        global _hinted
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            if not _hinted:   # a warning: the one line a CLI user sees without configuring logging
                log.warning("%s", ENABLE_HINT)
                _hinted = True
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            artifacts = None
            if not uri:   # the local default: quiet (MLflow logs its schema migrations at INFO)
                for noisy in ("mlflow.store.db.utils", "alembic"):
                    logging.getLogger(noisy).setLevel(logging.WARNING)
                store = self.out.resolve() / MLRUNS
                store.mkdir(mode=0o700, parents=True, exist_ok=True)   # settings, paths and weights: private
                uri, artifacts = local_store_uri(self.out), (store / "artifacts").as_uri()
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts)
            run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        except Exception as e:   # noqa: BLE001 - any store failure: warn, the run goes on untracked
            self._stop_mlflow(f"cannot start an MLflow run at {uri or 'the local store'}", e)
            return
        self.client, self.run_id, self.uri = client, run.info.run_id, uri
        log.info("MLflow run %s in %s", self.run_id, uri)

    def _stop_mlflow(self, what: str, e: Exception) -> None:
        log.warning("MLflow tracking off for this run: %s (%s: %s); the run goes on", what, type(e).__name__, e)
        self.client = None

    def _mlflow(self, what: str, method: str, *args, **kwargs) -> None:
        """MlflowClient.<method>(run id, ...), unless tracking is off; a failure turns it off (see the docstring)."""
        if self.client is None:
            return
        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as e:   # noqa: BLE001 - see _start_mlflow
            self._stop_mlflow(f"cannot {what}", e)

    # ----------------------------------------------------------------------------------------------- log
    def log_params(self, params: dict[str, Any]) -> None:
        """Params (nested dicts are flattened to dotted keys), in MLflow's batch size."""
        if self.client is None:
            return
        from mlflow.entities import Param

        flat = params_from(params)
        items = list(flat.items())
        for i in range(0, len(items), _BATCH):
            self._mlflow("log params", "log_batch", params=[Param(k, v) for k, v in items[i:i + _BATCH]])

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """One round's (or epoch's) metrics; None (a metric that does not exist this step) is left out."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
        if clean and self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow("log metrics", "log_batch", metrics=[Metric(k, v, now, int(step)) for k, v in clean.items()])

    def log_artifacts(self, folder: str | Path, name: str) -> None:
        """A folder (the bundle: model card and weights) as the run's artifact `name`."""
        self._mlflow(f"store {folder} as an artifact", "log_artifacts", str(folder), name)

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        self._mlflow("end the run", "set_terminated", "FINISHED" if ok else "FAILED")
        self.client = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
