"""`fedxray federation up | run | status | logs | down`: a local federation that outlives the command that
started it (server/standing.py), driven through the CLI as a coordinator would, on loopback with TLS and
SuperNode authentication. What is left running is checked with psutil (the federation's environment token
and its work folder on command lines), not by trusting `down`'s own report."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO
from tests.inference_support import trained_bundle
from tests.run_support import TINY, run_cli


def _fx(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(["-m", "fedxray", *args], env, timeout)


def _left(work, token: str, bystander: int = 0) -> list[str]:
    """What of the federation is still running: by its token, or naming its work folder on a command line."""
    from server.processes import describe, pids_with_arg, pids_with_token

    return [describe(pid) for pid in {*pids_with_token(token), *pids_with_arg(str(work), zombies=False)} - {bystander}]


def _assert_tracked(out) -> None:
    """The run's MLflow record (server/tracking.py, when MLflow is installed): params, and per round the same
    validation AUC as federation.json's history, read back through MLflow's own client."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return   # tests/test_tracking.py says how runs behave without it
    from common.tracking import EXPERIMENT, local_store_uri

    client = MlflowClient(tracking_uri=local_store_uri(out))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [r.data.tags["fedxray.kind"] for r in runs] == ["federation"]
    history = json.loads((out / "federation.json").read_text())["history"]
    logged = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "val_auc")}
    assert logged == {h["round"]: pytest.approx(h["global"]["val"]["auc"]) for h in history}
    assert runs[0].data.params["federation.rounds"] == "2"


@pytest.fixture
def flower_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("flower")


@pytest.mark.slow
@pytest.mark.integration
def test_up_stats_run_rotate_evaluate_down_on_loopback(synth_root, flower_tmp, tmp_path_factory):
    """The coordinator's day on 3 hospitals: `up` (TLS, SuperNode auth, hospital_1 with its own site policy)
    returns with every node online; a second `up` is refused; `stats` reports counts with small ones suppressed
    at each hospital's own threshold; a run that needs a 4th hospital fails clearly and leaves the federation up;
    a 2-round run streams its rounds and exports a bundle; hospital_2 gets a new key; `evaluate` scores the
    federated bundle and another one at every hospital (hospital_2 under its new key); `status` lists processes,
    nodes and runs; `logs` shows a hospital's ClientApp log. Then the caller of a run and the SuperLink are
    killed (SIGKILL) while the hospitals train: `down` still stops everything - the SuperLink's orphaned
    SuperExec and ServerApp, the hospitals' ClientApps, the `flwr run` stream, each a child of a process that is
    gone - and leaves alone a process that merely names the work folder."""
    from server.launch import flower_env
    from server.standing import state_path

    work = flower_tmp / "fed"
    env = flower_env(flower_tmp / "home")
    policy = flower_tmp / "policy-hospital_1.toml"
    policy.write_text("[disclosure]\nmin-count = 12\n")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    other = trained_bundle(tmp_path_factory)   # a centralised bundle: 64 px, another hospital's data
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", str(work)])
    token = None
    try:
        up = _fx("federation", "up", "--data", str(synth_root), "--workdir", str(work),
                 "--site-policy", f"hospital_1={policy}", env=env)
        assert up.returncode == 0, up.stdout[-3000:]
        assert "3 of 3 hospitals online" in up.stdout and "SuperNode auth on" in up.stdout, up.stdout
        token = json.loads(state_path(work).read_text())["token"]
        assert state_path(work).stat().st_mode & 0o077 == 0

        twice = _fx("federation", "up", "--data", str(synth_root), "--workdir", str(work), env=env)
        assert twice.returncode == 2 and "already up" in twice.stdout, twice.stdout

        stats = _fx("federation", "stats", "--workdir", str(work), "--profile", "demo", *sets, env=env)
        assert stats.returncode == 0, stats.stdout[-3000:]
        result = json.loads((work / "results" / "stats" / "stats.json").read_text())
        sites = result["hospitals"]
        assert sorted(sites) == ["hospital_1", "hospital_2", "hospital_3"] and all(h["ok"] for h in sites.values())
        assert sites["hospital_1"]["min_count"] == 12 and sites["hospital_2"]["min_count"] == 5
        assert "| hospital_1 | train |" in stats.stdout and "<12" in stats.stdout, stats.stdout[-3000:]

        short = _fx("federation", "run", "--workdir", str(work), "--profile", "demo", "--rounds", "1", *sets,
                    "--set=federation.min_available_nodes=4", "--set=federation.node_wait_timeout=1", env=env)
        assert short.returncode == 2 and "only 3 of the 4 SuperNodes" in short.stdout, short.stdout[-3000:]

        out = flower_tmp / "out"
        run = _fx("federation", "run", "--workdir", str(work), "--profile", "demo", "--rounds", "2", "--out",
                  str(out), *sets, "--set=federation.fraction_evaluate=0.0", "--set=federation.min_evaluate_nodes=0",
                  env=env, timeout=400)
        assert run.returncode == 0, run.stdout[-3000:]
        assert "round 1/2 | 3 of 3 hospitals trained" in run.stdout and "round 2/2 | 3 of 3" in run.stdout
        assert (out / "bundle").is_dir() and json.loads((out / "status.json").read_text())["state"] == "done"
        _assert_tracked(out)

        before = {n["site"]: n["node_id"] for n in json.loads(
            _fx("federation", "status", "--workdir", str(work), "--json", env=env).stdout)["nodes"]}
        rot = _fx("federation", "rotate-key", "--workdir", str(work), "hospital_2", env=env)
        assert rot.returncode == 0 and "new key" in rot.stdout, rot.stdout[-2000:]
        assert list(work.glob("certs/nodes/hospital_2.pub.retired-*"))

        ev = _fx("evaluate", "--workdir", str(work), "--bundle", str(out / "bundle"), "--bundle", str(other),
                 "--profile", "demo", *sets, env=env)
        assert ev.returncode == 0, ev.stdout[-3000:]
        matrix = json.loads((work / "results" / "evaluate" / "crosssite.json").read_text())
        assert len(matrix["bundles"]) == 2
        for b in matrix["bundles"]:
            assert sorted(b["hospitals"]) == ["hospital_1", "hospital_2", "hospital_3"], b["hospitals"]
            assert all(h["ok"] and h["num_examples"] > 0 for h in b["hospitals"].values()), b["hospitals"]
        assert (work / "results" / "evaluate" / "crosssite.png").stat().st_size > 0
        card = json.loads((out / "bundle" / "model.json").read_text())
        assert "hospital_2" in json.dumps(card["extra"]["crosssite"])

        st = json.loads(_fx("federation", "status", "--workdir", str(work), "--json", env=env).stdout)
        assert st["up"] and all(p["running"] for p in st["processes"]) and len(st["processes"]) == 7
        online = {n["site"]: n["node_id"] for n in st["nodes"] if n["status"] == "online"}
        assert sorted(online) == ["hospital_1", "hospital_2", "hospital_3"], st["nodes"]
        assert online["hospital_2"] != before["hospital_2"] and online["hospital_1"] == before["hospital_1"]
        assert [(r["job"], r["state"]) for r in st["runs"]] == [
            ("stats", "done"), ("train", "failed"), ("train", "done"), ("evaluate", "done")]
        text = _fx("federation", "status", "--workdir", str(work), env=env).stdout
        assert "3 online" in text and "train     done" in text, text

        from common.audit import files_under, find_identifying, identifying_strings

        secrets_ = set().union(*(identifying_strings(p) for p in synth_root.glob("hospital_*")))
        server_side = files_under(work / "results", out, work / "logs" / "superlink.log", work / "logs" / "run.log")
        assert {"stats.json", "crosssite.json", "federation.json"} <= {f.name for f in server_side}
        assert not find_identifying(secrets_, server_side)

        logs = _fx("federation", "logs", "--workdir", str(work), "superexec-hospital_2", "-n", "400", env=env)
        assert logs.returncode == 0 and "first training step" in logs.stdout, logs.stdout[-2000:]

        from server.processes import pids_with_token

        node_log = work / "logs" / "superexec-hospital_1.log"
        started = node_log.read_text().count("first training step")
        caller = subprocess.Popen([sys.executable, "-m", "fedxray", "federation", "run", "--workdir", str(work),
                                   "--profile", "demo", "--rounds", "2", "--out", str(flower_tmp / "crashed"), *sets],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120   # until hospital_1 trains in this run
        while time.monotonic() < deadline and node_log.read_text().count("first training step") == started:
            time.sleep(0.5)
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=10)
        mid_run = []
        for pid in pids_with_token(token):
            try:
                mid_run.append(" ".join(psutil.Process(pid).cmdline()[:3]))
            except psutil.Error:
                pass
        assert any("flwr run" in c for c in mid_run) and any("serverapp" in c for c in mid_run), mid_run
        link = next(r["pid"] for r in json.loads(state_path(work).read_text())["processes"] if r["name"] == "superlink")
        psutil.Process(link).kill()   # and the SuperLink crashes too: its ServerApp side is orphaned, not ours to see

        down = _fx("federation", "down", "--workdir", str(work), env=env)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout
        assert not _left(work, token, bystander.pid), _left(work, token, bystander.pid)
        assert bystander.poll() is None, "down stopped a process that only named its work folder"
        gone = _fx("federation", "status", "--workdir", str(work), env=env)
        assert "no federation is up" in gone.stdout, gone.stdout
        again = _fx("federation", "down", "--workdir", str(work), env=env)
        assert again.returncode == 0 and "nothing was running" in again.stdout, again.stdout
    finally:
        bystander.kill()
        bystander.wait()
        if token and _left(work, token):
            from server.standing import down

            down(work)
