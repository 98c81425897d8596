"""The federation's jobs beside training (server/jobs.py), in Flower's simulation runtime on three tiny synthetic
hospitals: `job=stats` (aggregate data statistics, small counts suppressed) and `job=evaluate` (exported bundles
x hospitals on each hospital's own test split at the bundle's thresholds). Expected numbers are computed here from
the data layer (client.data.load_node_data) and common.training.evaluate, not from the job's own code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from common.settings import Settings
from tests.conftest import SYNTH_FINDINGS
from tests.inference_support import trained_bundle
from tests.run_support import tiny_settings

SITES = ["hospital_1", "hospital_2", "hospital_3"]
K = 5   # DEFAULT_MIN_COUNT: the simulation's nodes have no site policy


def _settings(synth_root: Path, out: Path, **dotted) -> Settings:
    return tiny_settings({"data.path": str(synth_root), "federation.local_split": "train-val-test",
                          "federation.min_available_nodes": 3, "federation.node_wait_timeout": 60.0,
                          "output_dir": str(out)}, **dotted)


def _node(pid: int) -> dict:
    return {"partition-id": pid, "num-partitions": 3}


def _expected_counts(data, k: int) -> dict:
    """Per split: images, patients, positives per finding, straight from the node's datasets and manifest."""
    def shown(n: int):
        return n if n >= k else f"<{k}"

    out = {}
    for split, ds in data.datasets.items():
        y = ds.manifest.label_matrix(ds.indices)
        out[split] = {"images": shown(len(ds.indices)),
                      "patients": shown(len({ds.manifest.samples[i].patient_id for i in ds.indices})),
                      "positive": {f: shown(int(np.nansum(y[:, j]))) for j, f in enumerate(ds.manifest.findings)}}
    return out


def _no_identifying(synth_root: Path, out: Path) -> None:
    from common.audit import files_under, find_identifying, identifying_strings

    secrets_ = set().union(*(identifying_strings(synth_root / s) for s in SITES))
    found = find_identifying(secrets_, files_under(out))
    assert not found, found[:10]


# ------------------------------------------------------------------------------------------------ stats
@pytest.mark.integration
def test_stats_job_counts_what_the_data_layer_holds_with_small_counts_suppressed(synth_root, tmp_path):
    from client.data import load_node_data
    from server.federation import run_federated_simulation
    from server.jobs import format_stats_table

    s = _settings(synth_root, tmp_path / "stats", job="stats")
    result = run_federated_simulation(s, num_supernodes=3)
    out = Path(s.output_dir)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["result"] == "stats.json" and status["job"] == "stats"
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["hospitals"]) == set(SITES)
    suppressed = 0
    for pid, site in enumerate(SITES):
        h = result["hospitals"][site]
        data = load_node_data(_node(pid), s, list(SYNTH_FINDINGS))
        expected = _expected_counts(data, K)
        assert h["ok"] and h["min_count"] == K
        for split, exp in expected.items():
            got = h["splits"][split]
            assert {k: got[k] for k in ("images", "patients", "positive")} == exp, (site, split)
            assert got["size"]["<256"] == exp["images"]          # the synthetic images are 64 px
            assert got["size"][">=2048"] == f"<{K}"              # zero is suppressed too
            views = [got["view"][v] for v in ("frontal", "lateral", "unknown")]
            assert sum(v for v in views if isinstance(v, int)) <= len(data.datasets[split])
            suppressed += sum(v == f"<{K}" for v in exp["positive"].values())
        # nothing per image: only the fixed keys, and every value a count >= k or "<k"
        leaves = [v for sp in h["splits"].values() for part in sp.values()
                  for v in (part.values() if isinstance(part, dict) else [part])] + list(h["excluded"].values())
        assert all((isinstance(v, int) and v >= K) or v == f"<{K}" for v in leaves), leaves
        assert set(h["splits"]) == {"train", "val", "test"}
        assert all(set(sp) == {"images", "patients", "positive", "view", "size"} for sp in h["splits"].values())
    assert suppressed > 0   # the tiny hospitals do have findings with few positives in some split
    table = (out / "stats.md").read_text()
    assert table == format_stats_table(result)
    assert f"| hospital_1 | train | {result['hospitals']['hospital_1']['splits']['train']['images']} |" in table
    for flag in result["flags"]:
        assert f"- {flag}" in table
    few = [(site, split, f) for site, h in result["hospitals"].items() for split, sp in h["splits"].items()
           if isinstance(sp["images"], int) for f, v in sp["positive"].items() if v == f"<{K}"]
    assert few and all(f"{site}: <{K} positives for {f} in {split} (none or few)" in result["flags"]
                       for site, split, f in few)
    _no_identifying(synth_root, out)


def test_stats_suppression_follows_the_hospitals_site_policy(synth_root, tmp_path, task_identity):
    """k comes from the node's site policy (`[disclosure] min-count`), never from the run config."""
    from client.data import load_node_data
    from client.stats import SUPPRESSED, stats_reply

    s = _settings(synth_root, tmp_path / "unused")
    policy = tmp_path / "policy.toml"
    policy.write_text("[disclosure]\nmin-count = 12\n")
    node = {**_node(1), "site-policy": str(policy)}
    msg = Message(RecordDict({}), dst_node_id=2, message_type="query.stats")
    reply = stats_reply(msg, Context(run_id=7, node_id=2, node_config=node, state=RecordDict(),
                                     run_config=s.to_run_config()))
    m = dict(reply.content["stats"])
    assert m["min-count"] == 12 and dict(reply.content["node"]) == {"site": "hospital_2"}
    data = load_node_data(_node(1), s)
    for split, exp in _expected_counts(data, 12).items():
        assert m[f"{split}/images"] == (exp["images"] if isinstance(exp["images"], int) else SUPPRESSED)
        for f, v in exp["positive"].items():
            assert m[f"{split}/positive/{f}"] == (v if isinstance(v, int) else SUPPRESSED), (split, f)
    assert SUPPRESSED in m.values() and all(v == SUPPRESSED or v >= 12 for v in m.values())


def test_stats_count_the_data_layers_exclusions_by_category_through_the_boundary(synth_root, tmp_path, task_identity):
    """A deployment node whose folder has 2 truncated and 1 too-small image: the exclusions leave as counts per
    fixed category (ImageError codes), through the hospital boundary (no reply withheld), at the policy's k=1."""
    from PIL import Image

    from client.boundary import make_boundary_mod
    from client.stats import stats_reply

    site = Path(shutil.copytree(synth_root / "hospital_2", tmp_path / "site-b"))
    images = sorted((site / "images").glob("*.png"))
    for img in images[:2]:
        img.write_bytes(img.read_bytes()[:60])
    Image.new("L", (16, 16)).save(images[2])
    policy = tmp_path / "policy.toml"
    policy.write_text("[disclosure]\nmin-count = 1\n")
    node = {"data-path": str(site), "site-policy": str(policy), "cache-dir": "none"}
    s = _settings(synth_root, tmp_path / "unused")
    ctx = Context(run_id=7, node_id=2, node_config=node, state=RecordDict(), run_config=s.to_run_config())
    reply = make_boundary_mod()(Message(RecordDict({}), dst_node_id=2, message_type="query.stats"), ctx,
                                lambda m, c: stats_reply(m, c))
    assert not reply.has_error(), reply.error.reason
    m = dict(reply.content["stats"])
    assert (m["excluded/corrupt"], m["excluded/too_small"], m["excluded/total"]) == (2, 1, 3)
    assert sum(m[f"{sp}/images"] for sp in ("train", "val", "test")) == len(images) - 3


# ------------------------------------------------------------------------------------------------ evaluate
def _initial_bundle(path: Path, findings: list[str], s: Settings) -> Path:
    """An untrained smallcnn at the run's preprocessing (32 px, 1 channel: not the trained bundle's)."""
    from common.bundle import save_bundle
    from common.models import build_model
    from common.training import seed_everything

    seed_everything(0)
    model = build_model(s.network, len(findings), s.preprocess.channels)
    return save_bundle(path, model, model_config=s.network, preprocess=s.preprocess, findings=findings,
                       thresholds=[0.5] * len(findings))


@pytest.mark.integration
def test_evaluate_job_scores_each_bundle_on_each_hospitals_test_split(synth_root, tmp_path, tmp_path_factory):
    from client.data import load_node_data
    from common.bundle import load_bundle, read_card
    from common.training import evaluate, make_loader
    from server.federation import run_federated_simulation
    from server.jobs import format_crosssite_table

    base = _settings(synth_root, tmp_path / "unused")
    trained = Path(shutil.copytree(trained_bundle(tmp_path_factory), tmp_path / "trained" / "bundle"))
    initial = _initial_bundle(tmp_path / "initial" / "bundle", list(SYNTH_FINDINGS), base)
    alien = _initial_bundle(tmp_path / "alien" / "bundle", ["Cardiomegaly", "Fracture"], base)
    s = _settings(synth_root, tmp_path / "xsite", job="evaluate",
                  **{"crosssite.bundles": [str(trained), str(initial), str(alien)]})
    result = run_federated_simulation(s, num_supernodes=3)
    out = Path(s.output_dir)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["result"] == "crosssite.json"
    assert result["hospitals"] == SITES and [r["bundle"] for r in result["bundles"]] == [
        "trained/bundle", "initial/bundle", "alien/bundle"]
    b = load_bundle(trained)
    assert load_bundle(initial).preprocess != b.preprocess   # 32 px / 1 channel vs 64 px / 3 channels
    row = result["bundles"][0]
    total, weighted = 0, {m: 0.0 for m in ("auc", "f1", "accuracy", "precision", "recall")}
    for pid, site in enumerate(SITES):
        data = load_node_data(_node(pid), s.model_copy(update={"preprocess": b.preprocess}), b.findings)
        ds = data.datasets["test"]
        ref = evaluate(b.model, make_loader(ds, s.train.batch_size * 2, shuffle=False), b.findings,
                       thresholds=b.thresholds, multilabel=b.multilabel)
        got = row["hospitals"][site]
        assert got["ok"] and got["split"] == "test" and got["num_examples"] == len(ds)
        for m, v in got["macro"].items():
            assert v == pytest.approx(ref["macro"][m], abs=1e-9), (site, m)
        for f in b.findings:
            assert got["per_finding"][f]["auc"] == pytest.approx(ref["per_finding"][f]["auc"], abs=1e-9)
        total += len(ds)
        for m in weighted:
            weighted[m] += len(ds) * ref["macro"][m]
    assert row["pooled"]["num_examples"] == total
    for m, v in weighted.items():
        assert row["pooled"]["macro"][m] == pytest.approx(v / total, abs=1e-9)
    untrained = result["bundles"][1]
    assert all(h["ok"] and h["num_examples"] > 0 for h in untrained["hospitals"].values())
    assert untrained["hospitals"]["hospital_1"]["macro"] != row["hospitals"]["hospital_1"]["macro"]
    # a bundle predicting a finding the hospitals do not label: the boundary's code, not a crash
    assert {site: h.get("code") for site, h in result["bundles"][2]["hospitals"].items()} == {
        site: "data-labels" for site in SITES}
    # the model card records it; the table and the heatmap are written
    card = read_card(trained)["extra"]["crosssite"]
    assert card["hospitals"]["hospital_2"]["auc"] == row["hospitals"]["hospital_2"]["macro"]["auc"]
    assert card["operating_point"] == "the bundle's own thresholds" and card["pooled"] == row["pooled"]
    assert load_bundle(trained).model_id == b.model_id   # the weights' sha256 still checks
    assert read_card(alien)["extra"]["crosssite"]["hospitals"]["hospital_1"] == {"code": "data-labels"}
    table = (out / "crosssite.md").read_text()
    assert table == format_crosssite_table(result)
    assert f"| trained/bundle ({b.model_id}) | {row['hospitals']['hospital_1']['macro']['auc']:.3f} |" in table
    png = (out / "crosssite.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    _no_identifying(synth_root, out)


def test_evaluate_job_needs_bundles_named_in_the_run_config():
    from common.errors import SettingsError

    with pytest.raises(SettingsError, match="crosssite.bundles"):
        Settings.from_run_config({"job": "evaluate"})
    assert Settings.from_run_config({"job": "evaluate", "crosssite.bundles": "a/bundle,b/bundle"}
                                    ).crosssite.bundles == ["a/bundle", "b/bundle"]
