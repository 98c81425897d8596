"""Python entry points for federated training in Flower's simulation runtime.

`run_federated_simulation` runs the ServerApp and N virtual SuperNodes in this process through
`flwr.simulation.run_simulation` (present in Flower 1.42, marked deprecated in favour of `flwr run`): no
SuperLink, no FAB, nothing left running afterwards. Its run config cannot come from pyproject.toml, so the
apps are given the whole resolved Settings as their run config.
`flwr run .` is the CLI path to the same apps (see server/launch.py for both runtimes as processes).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common.settings import Settings
from common.errors import FedxrayError

# Flower must stay local and must not reinstall the app's dependencies (see the 1.42 notes).
FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
              "FLWR_DISABLE_UPDATE_CHECK": "1"}


def backend_config(num_supernodes: int, cpus: int | None = None, cpus_per_client: int = 1) -> dict:
    """Ray resources: `cpus_per_client` per ClientApp, so at most cpus // cpus_per_client train at once."""
    cpus = cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False}}


def run_federated_simulation(settings: Settings, *, num_supernodes: int = 3, cpus: int | None = None,
                             cpus_per_client: int = 1, verbose: bool = False) -> dict:
    """The run's job (settings.job; federated training by default) in the simulation runtime, in this process;
    returns its result file (status.json's `result`: federation.json's summary for training).

    settings: the whole run (common/settings.py), e.g. `Settings.build("demo", {"federation.rounds": 5})`;
    the apps receive all of it as their run config, so nothing falls back to pyproject's values.
    num_supernodes: virtual hospitals; with a folder of hospital_* sites, at most the number of sites.
    The bundle is in <output_dir>/bundle; the summary has history, best_round, validation, test, provenance.
    """
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import STATUS_FILE, make_server_app

    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    settings = absolute_paths(settings)   # Ray workers may not share this process's working directory
    out = Path(settings.output_dir)
    run_config = settings.to_run_config()
    status_path = out / STATUS_FILE
    status_path.unlink(missing_ok=True)
    run_simulation(server_app=make_server_app(run_config), client_app=make_client_app(run_config),
                   num_supernodes=num_supernodes, backend_config=backend_config(num_supernodes, cpus, cpus_per_client),
                   verbose_logging=verbose)
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    result = out / str(status.get("result") or "")
    if status.get("state") != "done" or not result.is_file():
        raise FedxrayError(f"the federated simulation ended without a result in {out}: "
                           f"{status.get('message') or 'see the log above'}")
    return json.loads(result.read_text())


def absolute_paths(settings: Settings) -> Settings:
    """The run's paths resolved against this working directory (processes started elsewhere see the same)."""
    keys = {"data.path": settings.data.path, "federation.server_data_path": settings.federation.server_data_path,
            "output_dir": settings.output_dir}
    return settings.updated(**{k: str(Path(v).expanduser().resolve()) for k, v in keys.items() if v})
