"""`python -m benchmarks --quick`: the smoke run of the benchmark suite. It checks the table's and the JSON's
shape, never a timing (speed goals live in the benchmark's own table). The deployment section is left out
here (two federations, ~2 minutes); the line it parses from the hospitals' logs is checked by the deployment
test that produces it (test_federated.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import suite

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"section", "what", "ours", "unit", "reference", "ratio", "goal", "met", "note", "detail"}


@pytest.mark.slow
def test_quick_suite_prints_one_table_and_writes_json_with_the_machine(tmp_path):
    sections = [s for s in suite.sections() if s != "deployment"]
    assert sections, "no benchmark sections found"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--sections", ",".join(sections),
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = list(tmp_path.glob("*.json"))   # a subset's quick run: bench-<sections>-quick.json, never bench.json
    assert [p.name for p in written] == [f"bench-{'+'.join(sections)}-quick.json"]
    result = json.loads(written[0].read_text())
    assert result["quick"] is True and result["sections"] == sections
    assert {"cpu", "cores", "versions"} <= set(result["machine"]) and result["machine"]["versions"]["torch"]
    assert len(result["started"]["loadavg"]) == 3 and len(result["ended"]["loadavg"]) == 3
    rows = result["rows"]
    assert {r["section"] for r in rows} == set(sections)
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["note"] != "failed", r
        assert r["ours"] is None or isinstance(r["ours"], (int, float))
        if r["goal"]:
            assert r["met"] in (True, False) or r["ratio"] is None, r
    header = proc.stdout.splitlines()[0].split("|")
    assert [h.strip() for h in header] == ["section", "what", "ours", "reference", "ratio", "goal", "met"]
    for r in rows:
        assert r["what"] in proc.stdout


def test_a_row_judges_its_ratio_against_its_goal():
    assert suite.Row("x", 3.0, "s", 2.0, goal_max=1.5).met is True
    assert suite.Row("x", 4.0, "s", 2.0, goal_max=1.5).met is False
    assert suite.Row("x", 1.8, "img/s", 2.0, goal_min=0.85).met is True
    assert suite.Row("x", 1.0, "img/s", 2.0, goal_min=0.85).met is False
    assert suite.Row("x", 1.0, "s", 2.0).met is None and suite.Row("x", None, "s", 2.0, goal_max=1).met is None
    text = suite.format_table([suite.Row("fast thing", 3.0, "s", 2.0, goal_max=1.5, section="demo")])
    assert "1.50x" in text and "<= 1.5x" in text and "met" in text


def test_a_failing_section_is_a_row_that_says_so_and_the_suite_fails(capfd):
    rows = suite.run_section("no_such_section", quick=True)
    assert len(rows) == 1 and rows[0].note == "failed" and "no_such_section" in rows[0].what


def test_unknown_section_is_refused_with_the_choices():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--sections", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "choose from" in proc.stderr


def test_the_gap_benchmark_finds_the_default_federation_among_results_json_arms():
    """results.json stores an arm's params nested; the goal is judged on the default federation's arm only."""
    from benchmarks.federated_vs_centralised import is_default
    from common.settings import FederationConfig

    defaults = FederationConfig()
    other = "constant" if defaults.lr_schedule == "cosine" else "cosine"
    for params in ({"federation.lr_schedule": other}, {"federation": {"lr_schedule": other}}):
        assert not is_default({"strategy": defaults.strategy, "params": params}, defaults)
    for params in ({}, {"federation": {"lr_schedule": defaults.lr_schedule}}, {"train": {"lr": 0.01}}):
        assert is_default({"strategy": defaults.strategy, "params": params}, defaults)
    assert not is_default({"strategy": defaults.strategy, "params": {"federation": {"proximal_mu": 0.01}}}, defaults)
    other = "fresh" if defaults.local_optimizer == "kept" else "kept"
    assert not is_default({"strategy": defaults.strategy, "params": {"federation.local_optimizer": other}}, defaults)
    assert is_default({"strategy": defaults.strategy, "params": {
        "federation": {"local_optimizer": defaults.local_optimizer, "proximal_mu": defaults.proximal_mu}}}, defaults)
    assert not is_default({"strategy": "fedadam", "params": {}}, defaults)
