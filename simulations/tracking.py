"""Per-round metrics to TensorBoard event files (and MLflow when it is installed), as researchers expect.

Tags are `<metric>` under a run folder `tensorboard/<partition>/<arm>`, so TensorBoard overlays arms.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, root: Path, partition: str, arm: str, enabled: bool = True, experiment: str = "fedxray"):
        self.writer = self.mlflow = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(root) / "tensorboard" / partition / arm))
        except ImportError:
            log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
        try:
            import mlflow
        except ImportError:
            return
        mlflow.set_experiment(experiment)
        self.mlflow = mlflow.start_run(run_name=f"{partition}/{arm}")
        self._mlflow = mlflow

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
        if self.mlflow is not None:
            self._mlflow.log_metrics(clean, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.mlflow is not None:
            self._mlflow.end_run()
