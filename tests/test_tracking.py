"""Run tracking (common/tracking.py): `fedxray train` and `fedxray federate` leave an MLflow run (params = the
flattened settings + fingerprints, per-epoch / per-round metrics, the bundle as an artifact) in <out>/mlruns
beside TensorBoard's event files; without MLflow the runs work and say once how to enable it; a store that
cannot be written never fails a run. `fedxray federate`'s record is checked by tests/test_federated.py's
resume test, `fedxray federation run`'s by tests/test_standing.py, `fedxray simulate`'s by
tests/test_simulations.py's end to end: each on a run those tests make anyway.)"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from common.settings import Settings
from tests.run_support import TINY

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _mlflow():
    return pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'fedxray[tracking]')")


def _train_settings(root: Path, out: Path, epochs: int = 2) -> Settings:
    return Settings.build("demo", TINY, {"data.path": str(root / "hospital_1"), "train.epochs": epochs,
                                         "train.num_threads": 2, "output_dir": str(out)})


def _only_run(out: Path, kind: str):
    """The one MLflow run in <out>/mlruns, read back through MLflow's own client."""
    from mlflow.tracking import MlflowClient

    from common.tracking import EXPERIMENT, local_store_uri

    client = MlflowClient(tracking_uri=local_store_uri(out))
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no MLflow experiment in {out / 'mlruns'}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.data.tags["fedxray.kind"] == kind and run.info.status == "FINISHED"
    return client, run


def _steps(client, run, metric: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}


def _assert_bundle_artifact(client, run, bundle: Path) -> None:
    """The logged bundle is the bundle: same files, and the weights' bytes are those the card's sha256 names."""
    from common.bundle import CARD_FILE, WEIGHTS_FILE, sha256_file

    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert names == {CARD_FILE, WEIGHTS_FILE}, names
    local = Path(client.download_artifacts(run.info.run_id, f"bundle/{WEIGHTS_FILE}"))
    card = json.loads((bundle / CARD_FILE).read_text())
    assert sha256_file(local) == card["weights"]["sha256"]


def _assert_settings_params(run, settings: Settings) -> None:
    from common.tracking import params_from

    want = params_from(settings.model_dump(mode="json"))
    got = {k: v for k, v in run.data.params.items() if not k.startswith("fingerprint.")}
    assert got == want
    assert run.data.params["fingerprint.settings"] == settings.fingerprint()


def test_train_logs_params_epoch_metrics_and_the_bundle_to_mlflow(synth_root, tmp_path):
    _mlflow()
    from common.centralised import run_centralised

    cfg = _train_settings(synth_root, tmp_path / "run")
    summary = run_centralised(cfg, progress=False)
    client, run = _only_run(tmp_path / "run", "train")
    _assert_settings_params(run, cfg)
    assert len(run.data.params["fingerprint.data"]) == 16
    for row in summary["history"]:   # every epoch, the numbers metrics.json holds
        for k in ("train_loss", "val_loss", "val_f1", "val_auc"):
            assert _steps(client, run, k)[row["epoch"]] == pytest.approx(row[k]), k
    assert set(_steps(client, run, "val_auc")) == {1, 2}
    assert _steps(client, run, "test_auc") == {summary["best_epoch"]: pytest.approx(summary["test"]["macro"]["auc"])}
    assert run.data.tags["fedxray.run_id"] == summary["run_id"]
    _assert_bundle_artifact(client, run, Path(summary["bundle"]))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_without_mlflow_runs_work_and_say_once_how_to_enable_it(synth_root, tmp_path, monkeypatch, caplog):
    """MLflow hidden from this process (an import of it fails as when it is not installed)."""
    import common.tracking as tracking
    from common.centralised import run_centralised

    for name in ("mlflow", "mlflow.tracking", "mlflow.entities"):   # also when an earlier test imported them
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(tracking, "_hinted", False)
    caplog.set_level(logging.INFO, logger="common.tracking")
    for name in ("a", "b"):
        summary = run_centralised(_train_settings(synth_root, tmp_path / name, epochs=1), progress=False)
        assert Path(summary["bundle"], "model.json").is_file() and (tmp_path / name / "metrics.json").is_file()
        assert not (tmp_path / name / "mlruns").exists()
        assert list((tmp_path / name / "tensorboard").glob("events.out.tfevents.*"))
    hints = [r for r in caplog.records if r.getMessage() == tracking.ENABLE_HINT]
    assert len(hints) == 1 and "pip install 'fedxray[tracking]'" in tracking.ENABLE_HINT


def test_a_store_that_cannot_be_written_warns_and_the_run_goes_on(synth_root, tmp_path, monkeypatch, caplog):
    _mlflow()
    from common.centralised import run_centralised
    from common.tracking import Tracker

    caplog.set_level(logging.WARNING, logger="common.tracking")
    # the store itself cannot be created (its folder is a file): the tracker starts untracked
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}")
    with Tracker(tmp_path / "t", kind="train", name="t", params={"a": 1}) as t:
        t.log(1, {"val_auc": 0.5})
        assert t.client is None
    assert any("MLflow tracking off for this run: cannot start an MLflow run" in r.getMessage()
               for r in caplog.records)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    caplog.clear()
    # the store works but the bundle cannot be stored (the artifact folder is a file): training still finishes
    out = tmp_path / "run"
    (out / "mlruns").mkdir(parents=True)
    (out / "mlruns" / "artifacts").write_text("in the way")
    summary = run_centralised(_train_settings(synth_root, out, epochs=1), progress=False)
    assert Path(summary["bundle"], "weights.safetensors").is_file() and (out / "metrics.json").is_file()
    assert any("cannot store" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_mlflow_tracking_uri_set_by_the_user_is_where_runs_go(tmp_path, monkeypatch):
    _mlflow()
    from mlflow.tracking import MlflowClient

    from common.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    with Tracker(tmp_path / "run", kind="train", name="r", params={"train": {"epochs": 3}}) as t:
        t.log(1, {"val_auc": 0.75, "epsilon": None})
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(t.run_id)
    assert run.data.params == {"train.epochs": "3"} and run.data.metrics == {"val_auc": 0.75}
    assert client.get_experiment(run.info.experiment_id).name == "mine"


def test_params_are_dotted_strings_within_mlflows_limit():
    from common.tracking import PARAM_VALUE_MAX, params_from

    p = params_from({"data": {"path": "x" * 7000, "findings": ["A", "B"], "max_samples": None}, "seed": 1})
    assert p["data.findings"] == "A,B" and p["data.max_samples"] == "" and p["seed"] == "1"
    assert len(p["data.path"]) == PARAM_VALUE_MAX and p["data.path"].endswith("...")
