"""What leaves a hospital, on the real deployment runtime: flower-superlink + five flower-supernodes over TLS on
loopback, `flwr run` submitting the app, Flower's own Message transport and state database.

Two hospitals have good data and a site policy (DP required, epsilon at most 2.5 per run and in total, a ledger
on their own disk); three have data broken the ways real data breaks. Two runs on the same federation:
  B. DP at epsilon 2: within policy, the good hospitals train, the run completes with them alone;
  C. DP at epsilon 2 again: the ledger carried from B puts the total above 2.5 -> refused by both, and the
     run stops saying why, naming every hospital with its reason.
Then the two jobs beside training (server/jobs.py) on the same SuperNodes: S, data statistics, and E, B's bundle
scored on every hospital; the broken hospitals appear under their failure codes.
(Each other rule of the policy, e.g. a run without DP, is refused in-process in tests/test_boundary.py.)
Afterwards nothing the server side holds - the SuperLink's database and log, the submitter's stream, every
file the ServerApp wrote - contains a path, a file name, a CSV line or a patient id of any hospital, while
each broken hospital's own log has the detail under the incident id the server was given.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.audit import files_under, find_identifying, identifying_strings
from common.data.synthetic import break_hospital
from tests.test_boundary import BREAKS
from tests.run_support import TINY, tiny_settings

RUN = {**TINY, "federation.node_wait_timeout": 90.0, "federation.round_timeout": 300.0, "federation.rounds": 1, "federation.min_available_nodes": 5,
        "federation.min_train_nodes": 2, "federation.min_evaluate_nodes": 0, "federation.fraction_evaluate": 0.0, "privacy.delta": 1e-5}
BROKEN = ("missing-images", "bad-header", "unknown-label")
POLICY = ('[privacy]\nrequire-dp = true\nmax-epsilon-per-run = 2.5\nmax-epsilon-total = 2.3\n'
          'ledger = "ledger.json"\n')


@pytest.mark.slow
@pytest.mark.integration
def test_nothing_identifying_reaches_the_server_and_the_site_policy_is_the_hospitals(synth_root, tmp_path):
    from server.launch import LocalFederation
    from server.processes import pids_with_arg

    hospitals = {"site-a": str(synth_root / "hospital_1"), "site-b": str(synth_root / "hospital_2")}
    private = {}
    for site in hospitals:
        folder = tmp_path / f"{site}-private"
        folder.mkdir()
        (folder / "policy.toml").write_text(POLICY)
        private[site] = folder
    for i, how in enumerate(BROKEN):
        hospitals[f"broken-{i}"] = str(break_hospital(synth_root / "hospital_3", tmp_path / f"data-0010007{i}", how))
    extra = {s: {"site-policy": str(private[s] / "policy.toml"), "log-file": str(private[s] / "node.log")}
             for s in private}
    work = tmp_path / "fed"
    fed = LocalFederation(work, hospitals, node_extra=extra)
    outs = {k: tmp_path / f"out-{k}" for k in "BCS"}   # broken folders are named data-0010007N: ids too
    rc = {**RUN, "data.path": str(synth_root), "federation.server_data_path": str(synth_root / "holdout")}
    try:
        fed.start()
        b = fed.submit(tiny_settings({**rc, "output_dir": str(outs["B"]), "privacy.enabled": True, "privacy.target_epsilon": 2.0}),
                       timeout=600)
        c = fed.submit(tiny_settings({**rc, "output_dir": str(outs["C"]), "privacy.enabled": True, "privacy.target_epsilon": 2.0,
                        "train.seed": 43}), timeout=400)
        # a job beside training on the same SuperNodes (server/jobs.py; the cross-site evaluation's replies pass
        # the same boundary, and tests/test_standing.py runs it on loopback): data statistics
        st = fed.submit(tiny_settings({**rc, "output_dir": str(outs["S"]), "job": "stats"}), timeout=400)
        print(f"\nruns B {b.seconds:.0f} s, C {c.seconds:.0f} s, stats {st.seconds:.0f} s", flush=True)
    finally:
        fed.stop()
    assert not fed.alive() and not pids_with_arg(str(work))

    # B: within policy, trained by the two good hospitals alone; the rest recorded by site and code
    assert b.ok, (b.status, b.log.read_text()[-3000:])
    fed_b = b.summary["provenance"]["federation"]
    assert set(fed_b["nodes"]) == set(private)
    per = fed_b["dp"]["client_dp_sgd"]["per_hospital"]
    assert set(per) == set(private) and all(0 < v["epsilon"] <= 2.0 * 1.02 for v in per.values())
    rows = b.summary["history"][1]["clients"]["train"]
    assert {r["site"]: r.get("code") for r in rows if not r["ok"]} == {
        f"broken-{i}": BREAKS[how] for i, how in enumerate(BROKEN)}
    assert "2 hospitals in the selected round 1 (site-a, site-b)" in b.summary["table"]

    # C: the ledgers carried from run B put the hospitals' total epsilon above their limit
    assert c.status["state"] == "failed", c.status
    msg = c.status["message"]
    assert "no hospital returned a model update" in msg
    for i, how in enumerate(BROKEN):
        assert f"broken-{i}: {BREAKS[how]} (DataError)" in msg, msg
    for site in private:
        assert f"{site}: policy-refused" in c.status["message"] and "rule=max-epsilon-total" in c.status["message"]
        ledger = json.loads((private[site] / "ledger.json").read_text())
        assert len(ledger["runs"]) == 1 and 0 < ledger["total_epsilon"] <= 2.0 * 1.02

    # S: every good hospital answers, every broken one appears under its failure code
    assert st.ok, st.status
    codes = {f"broken-{i}": BREAKS[how] for i, how in enumerate(BROKEN)}
    assert {site: h.get("code") for site, h in st.summary["hospitals"].items() if not h["ok"]} == codes
    assert all(st.summary["hospitals"][site]["ok"] for site in private)

    # nothing identifying anywhere on the server side (stats.json among them)
    secrets_ = {str(private["site-a"]), str(private["site-b"])}
    secrets_ |= {Path(hospitals[f"broken-{i}"]).name for i in range(len(BROKEN))}
    for path in (*hospitals.values(), synth_root / "hospital_3"):
        secrets_ |= identifying_strings(Path(path))
    server_side = files_under(work / "superlink", work / "logs" / "superlink.log", work / "logs" / "run.log",
                              *outs.values())
    assert {"stats.json", "stats.md"} <= {f.name for f in server_side}
    assert len(server_side) > 10 and any(f.name == "state.db" for f in server_side)
    found = find_identifying(secrets_, server_side)
    assert not found, found[:10]

    # ... while each broken hospital's own log has the detail under the incident id the server recorded
    failures = [r for r in rows if not r["ok"]]
    def node_log(site: str) -> str:   # the SuperNode's output and its SuperExec's (where the ClientApps write)
        return "".join((work / "logs" / f"{kind}-{site}.log").read_text() for kind in ("supernode", "superexec"))

    for r in failures:
        assert f"incident {r['failure']['incident']}" in node_log(r["site"])
    assert "missing on disk" in node_log("broken-0")
