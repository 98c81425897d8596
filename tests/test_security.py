"""Federation security on loopback: certificates, TLS, SuperNode authentication, signed apps, SecAgg+.

Integration tests start real flower-superlink / flower-supernode / flwr processes, each with its own
FLWR_HOME and free ports and in its own process group; `LocalFederation.stop()` runs in `finally`, and the
session's `nothing_left_running` fixture (tests/conftest.py) checks that nothing started here survived. Waits
are bounded (a misconfigured node must exit by itself within NODE_EXIT_S).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.conftest import REPO
from tests.run_support import TINY, tiny_settings

RUN = {**TINY, "federation.node_wait_timeout": 90.0, "federation.round_timeout": 300.0}
NODE_EXIT_S = 120          # a node with a bad identity / no CA gives up by itself well within this


# ------------------------------------------------------------------------------------------------ certs
def test_certs_command_writes_a_ca_a_superlink_cert_node_keys_and_a_signing_key(tmp_path):
    from fedxray.cli import main

    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "superlink.hospital.net", "--host", "10.0.0.5",
                 "--hospital", "hospital_1", "--signing-key"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.hospital.net", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    node = serialization.load_ssh_private_key((out / "nodes" / "hospital_1").read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert (out / "nodes" / "hospital_1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    signer = serialization.load_ssh_private_key((out / "signing" / "app-signer").read_bytes(), None)
    assert isinstance(signer, ed25519.Ed25519PrivateKey)
    for private in (out / "ca.key", out / "superlink.key", out / "nodes" / "hospital_1",
                    out / "signing" / "app-signer"):
        assert private.stat().st_mode & 0o777 == 0o600
    assert main(["certs", "--out", str(out)]) == 2          # never silently replaces a CA hospitals trust
    assert main(["certs", "--out", str(out), "--force"]) == 0


def test_signature_verifies_with_flowers_own_supernode_check(tmp_path):
    """The entry sign_fab writes, formatted as the SuperLink does for Hub apps, passes Flower's `_verify_fab`;
    another FAB, or a key the node does not trust, fails it."""
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.start_client_internal import _verify_fab

    from server.appsign import sign_fab
    from server.certs import make_signing_key

    key, pub = make_signing_key(tmp_path, "release")
    other, other_pub = make_signing_key(tmp_path, "someone-else")
    fab = b"PK\x03\x04 any FAB bytes"
    verif = _format_verification([sign_fab(fab, key, "release")])
    trusted = {"release": pub.read_text().strip()}
    assert _verify_fab(Fab("h", fab, verif), trusted)
    assert not _verify_fab(Fab("h", fab + b"!", verif), trusted)                        # tampered
    assert not _verify_fab(Fab("h", fab, _format_verification([sign_fab(fab, other, "release")])), trusted)
    assert not _verify_fab(Fab("h", fab, verif), {"release": other_pub.read_text().strip()})


def test_security_flags_and_explicit_insecure(tmp_path):
    from common.errors import FedxrayError
    from server.security import Security

    sec = Security.generate(tmp_path / "c", ["h1"], auth=True)
    assert "--enable-supernode-auth" in sec.superlink_args() and "--insecure" not in sec.superlink_args()
    args = sec.supernode_args("h1")
    assert args[:2] == ["--root-certificates", str(sec.tls.ca)] and "--auth-supernode-private-key" in args
    assert Security.generate(tmp_path / "c", ["h1"]).tls.ca == sec.tls.ca      # reuses an existing CA
    assert Security.insecure().superlink_args() == ["--insecure"]
    with pytest.raises(FedxrayError, match="needs TLS"):
        Security.insecure().with_(supernode_auth=True).superlink_args()


# ------------------------------------------------------------------------------------------------ loopback
@pytest.fixture
def flower_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("sec")


def _wait_exit(proc, timeout: float = NODE_EXIT_S) -> tuple[int | None, float]:
    t0 = time.monotonic()
    try:
        return proc.popen.wait(timeout=timeout), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.integration
def test_tls_auth_and_signed_apps_on_loopback(synth_root, flower_tmp):
    """One TLS federation with SuperNode authentication and trusted entities (2 registered hospitals): an
    unregistered key is refused (exit 305); a node without the CA cannot connect; a tampered and an unsigned
    app are refused by the hospitals (a plain local `flwr run <dir>` app is unsigned: the same refusal). (That the signed app runs on such a
    federation: test_federated.py's launch test, `--sign-with` with SuperNode authentication.)"""
    import contextlib

    from server.appsign import KEY_ID, AppRegistry, app_spec, build_fab, sign_fab, tamper, write_trusted_entities
    from server.certs import make_node_key, make_signing_key
    from server.launch import LocalFederation, hospitals_in
    from server.security import UNREGISTERED_EXIT, Security, flower_exit_code

    work = flower_tmp / "fed"
    hospitals = dict(list(hospitals_in(synth_root).items())[:2])
    key, pub = make_signing_key(work / "certs")
    app_id, version = app_spec(REPO)
    fab = build_fab(REPO)
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(AppRegistry())
        registry.publish(app_id, version, fab, [sign_fab(fab, key, KEY_ID)])
        registry.publish(app_id, "9.9.1", tamper(REPO), [sign_fab(fab, key, KEY_ID)])  # old signature, new code
        registry.publish(app_id, "9.9.2", fab, None)                                  # not signed at all
        security = Security.generate(work / "certs", list(hospitals), auth=True).with_(
            trusted_entities=write_trusted_entities(work / "trusted.yaml", {KEY_ID: pub}), registry_url=registry.url)
        fed = LocalFederation(work, hospitals, security=security)
        try:
            fed.start()
            rc = {**RUN, "data.path": str(synth_root), "federation.rounds": 1, "federation.min_available_nodes": 2,
                  "federation.min_train_nodes": 2, "federation.min_evaluate_nodes": 2}
            intruder_key, _ = make_node_key(work / "certs", "intruder")       # never registered
            intruder = fed.add_node("intruder", hospitals["hospital_1"], key=intruder_key)
            no_ca = fed.add_node("no-ca", hospitals["hospital_1"], trust_ca=False,   # registered key, no CA
                                 key=security.node_keys["hospital_1"])
            code, secs = _wait_exit(intruder)                 # refused: the node ends by itself
            log = intruder.log.read_text()
            assert code == 1 and flower_exit_code(log) == UNREGISTERED_EXIT, (code, secs, log[-1500:])
            assert "Failed to activate SuperNode" in log
            code, secs = _wait_exit(no_ca)
            log = no_ca.log.read_text()
            assert code == 1 and flower_exit_code(log) == UNREGISTERED_EXIT, (code, secs, log[-1500:])
            assert "CERTIFICATE_VERIFY_FAILED" in log

            # a plain local app (`flwr run <dir>`) carries no signature either: refused as the unsigned one is
            for name, app in (("tampered", f"{app_id}==9.9.1"), ("unsigned", f"{app_id}==9.9.2")):
                t0 = time.monotonic()
                bad = fed.submit(tiny_settings({**rc, "output_dir": str(flower_tmp / name)}), timeout=300, app=app)
                assert bad.status.get("state") == "failed", (name, bad.status, bad.log.read_text()[-2000:])
                assert "The FAB could not be verified" in bad.status["message"], name
                assert time.monotonic() - t0 < 300
            logs = "".join((work / "logs" / f"supernode-{h}.log").read_text() for h in hospitals)
            assert "FAB verification failed" in logs                     # the tampered one: bad signature
            assert "App verification is not supported" in logs           # unsigned: no signature
        finally:
            fed.stop()
        assert not fed.alive()


def test_secagg_masks_scaled_updates_that_stay_inside_the_clipping_range():
    """What a hospital hands SecAgg+ is its update divided by a per-array scale both sides derive from the
    global model (client/mods.py); the server adds scale x the aggregate back (server/secagg.py). A round of
    a network from scratch moves BatchNorm running variances from 1 to ~10 (measured on ResNet-50):
    absolute weights then exceed SecAgg+'s +/- clipping_range and were clipped; the scaled updates do not,
    and the example-weighted mean of the scaled updates gives back FedAvg's mean in the global dtypes."""
    from flwr.app import Array, ArrayRecord

    from client.mods import scaled_update
    from common.settings import SecAggConfig
    from server.secagg import apply_update

    rng = np.random.default_rng(0)
    g = {"conv.weight": (rng.normal(size=(8, 3, 3, 3)) * 0.2).astype(np.float32),
         "bn.weight": np.ones(8, np.float32), "bn.running_mean": np.zeros(8, np.float32),
         "bn.running_var": np.ones(8, np.float32), "bn.num_batches_tracked": np.array(0, np.int64)}
    examples, max_weight, clip = [30, 45, 60], 60.0, SecAggConfig().clipping_range
    locals_ = [{"conv.weight": g["conv.weight"] + rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.05,
                "bn.weight": g["bn.weight"] * 1.1, "bn.running_mean": np.full(8, 3.0 * h, np.float32),
                "bn.running_var": np.linspace(2.0, 10.6 + h, 8).astype(np.float32),
                "bn.num_batches_tracked": np.array(40 + h, np.int64)} for h in range(3)]
    # SecAgg+ clips num-examples / max_weight x value to +/- clipping_range
    weighted = lambda n, x: np.abs(n / max_weight * np.asarray(x, np.float64)).max()  # noqa: E731
    assert max(weighted(n, loc["bn.running_var"]) for n, loc in zip(examples, locals_)) > clip
    updates = [scaled_update(g, loc) for loc in locals_]
    assert max(weighted(n, u) for n, u_all in zip(examples, updates) for u in u_all) < clip / 2
    mean = [np.asarray(sum(n * u[i] for n, u in zip(examples, updates)) / sum(examples)) for i in range(len(g))]
    names = list(g)
    out = apply_update(ArrayRecord({str(i): Array(a) for i, a in enumerate(g.values())}),
                       ArrayRecord({str(i): Array(m) for i, m in enumerate(mean)}), names)
    got = dict(zip(names, out.to_numpy_ndarrays()))
    for k in names:
        fedavg = sum(n * np.asarray(loc[k], np.float64) for n, loc in zip(examples, locals_)) / sum(examples)
        assert got[k].dtype == g[k].dtype, k
        np.testing.assert_allclose(got[k], np.rint(fedavg) if g[k].dtype.kind == "i" else fedavg, rtol=1e-6,
                                   atol=1e-6, err_msg=k)


def test_secagg_stage_rows_become_one_row_per_hospital_with_every_stage_bytes(caplog):
    """SecAgg+ sends four train-type messages a round; federation.json wants one row per hospital: the stage
    that carries its metrics (num-examples), with the bytes of all four, and a warning if it clipped."""
    from server.secagg import merge_stage_rows

    rows = [{"node_id": n, "site": f"h{n}", "type": "train", "ok": True, "metrics": {}, "bytes_up": b}
            for n in (1, 2) for b in (100, 10)]
    rows += [{"node_id": 1, "site": "h1", "type": "train", "ok": True, "bytes_up": 5000,
              "metrics": {"num-examples": 30, "secagg-clipped": 0}},
             {"node_id": 2, "site": "h2", "type": "train", "ok": True, "bytes_up": 7000,
              "metrics": {"num-examples": 40, "secagg-clipped": 3}},
             {"node_id": 3, "site": "h3", "type": "train", "ok": False, "error": "no reply"},
             {"node_id": 1, "site": "h1", "type": "evaluate", "ok": True, "metrics": {}}]
    with caplog.at_level("WARNING"):
        out = merge_stage_rows(rows, 4)
    train = {r["node_id"]: r for r in out if r["type"] == "train"}
    assert sorted(train) == [1, 2, 3] and len([r for r in out if r["type"] == "evaluate"]) == 1
    assert train[1]["bytes_up"] == 5110 and train[2]["bytes_up"] == 7110 and train[2]["metrics"]["num-examples"] == 40
    assert "round 4: h2 clipped 3 values" in caplog.text and "h1 clipped" not in caplog.text


@pytest.mark.slow
@pytest.mark.integration
def test_secaggplus_two_rounds_match_fedavg(synth_root, flower_tmp):
    """The same 2-round run (same seeds) with plain FedAvg and with Flower's SecAgg+ workflow: the global
    weights agree within the quantisation error propagated through a round of training; round 1's global
    validation metrics agree. The per-round time of both is printed (the cost of SecAgg+ here)."""
    from safetensors.numpy import load_file

    from server.launch import flower_env
    from server.processes import stop_tree

    ray_tmp = Path("/tmp") / f"raysec{os.getpid()}"
    env = flower_env(flower_tmp / "home", ray_tmp)
    runs = {}
    for mode in ("fedavg", "secagg"):
        out = flower_tmp / mode
        sets = [f"--set={k}={json.dumps(v)}" for k, v in RUN.items()]
        sets += ["--set=secagg.enabled=true", "--set=secagg.max_weight=60"] if mode == "secagg" else []
        p = subprocess.Popen([sys.executable, "-m", "fedxray", "federate", "--profile", "demo", "--data", str(synth_root), "--out",
                              str(out), "--supernodes", "3", "--rounds", "2", *sets], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = p.communicate(timeout=600)
        finally:
            stop_tree(p.pid, grace=5)
        assert p.returncode == 0, log[-3000:]
        summary = json.loads((out / "federation.json").read_text())
        runs[mode] = (load_file(str(out / "checkpoint" / "global-r0002.safetensors")), summary)
        if mode == "secagg":
            assert log.count("Secure aggregation completed") == 2
            assert summary["provenance"]["federation"]["secure_aggregation"] == "SecAgg+"
    (a, sa), (b, sb) = runs["fedavg"], runs["secagg"]
    assert {k: str(v.dtype) for k, v in b.items()} == {k: str(v.dtype) for k, v in a.items()}   # not float64
    # SecAgg+'s stage rows are merged per hospital: its examples, and its bytes (four stages, ~2x FedAvg's up)
    fa, fs = sa["provenance"]["federation"], sb["provenance"]["federation"]
    assert fs["examples_per_node"] == fa["examples_per_node"] and min(fa["examples_per_node"].values()) > 0
    assert fs["bytes_per_client_per_round"]["up"] > 1.5 * fa["bytes_per_client_per_round"]["up"] > 0
    assert fs["bytes_per_client_per_round"]["down"] >= fa["bytes_per_client_per_round"]["down"] > 0
    clipped = [c["metrics"].get("secagg-clipped") for h in sb["history"][1:] for c in h["clients"]["train"]]
    assert clipped and set(clipped) == {0}
    floats = [k for k in a if "num_batches_tracked" not in k]   # SecAgg+ quantises every array, ints included
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in floats)
    scale = max(float(np.abs(a[k]).max()) for k in floats)
    assert diff < 0.02 * max(scale, 1.0), diff
    assert sa["history"][1]["global"]["val"]["auc"] == pytest.approx(sb["history"][1]["global"]["val"]["auc"], abs=0.01)
    secs = {m: [h.get("seconds") for h in s["history"][1:]] for m, (_, s) in runs.items()}
    print(f"\nseconds per round (training + global evaluation): {secs}; max |w_fedavg - w_secagg| = {diff:.2e}")
