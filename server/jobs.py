"""The federation's jobs beside training, run by the same ServerApp against the same SuperNodes (`job` in the
run config, common/settings.py; server/app.py `run_server` dispatches here):

* `stats`: every connected hospital answers a `query.stats` message with aggregate data statistics of the
  split training makes (client/stats.py), each count below the hospital's own threshold k sent as "<k".
  Result: <output_dir>/stats.json and stats.md (`format_stats_table`), with flags such as
  "hospital_2: <5 positives for Nodule in train (none or few)".
* `evaluate`: each bundle named by `crosssite.bundles` (read from the server's disk, common/bundle.py) goes to
  every hospital in an `evaluate.bundle` message; each scores it on its own test split at the bundle's own
  thresholds (client/crosssite.py). Result: a bundle x hospital matrix with a pooled column, in
  crosssite.json, crosssite.md (`format_crosssite_table`) and crosssite.png, and a `crosssite` record in
  each bundle's model card (common.bundle.update_card).

Waits are bounded as in training (server/grid.py GuardedGrid: federation.min_available_nodes within
federation.node_wait_timeout, replies within federation.round_timeout). A hospital that fails or does not
answer appears under its failure code (client/boundary.py's vocabulary), the others are still reported. What
the server writes holds site names, counts and metrics only: the replies carry nothing else.
"""
from __future__ import annotations

import logging
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from client.crosssite import BUNDLE_RECORD, METRICS, bundle_config
from client.stats import MIN_COUNT_KEY, SIZE_BINS, VIEWS, render_count
from common.arrays import state_to_record
from common.bundle import load_bundle, update_card
from common.errors import FedxrayError
from common.fileio import jsonable, write_atomic, write_json
from common.plots import plot_heatmap
from common.settings import Settings
from server.grid import GuardedGrid, NotEnoughNodes, who
from server.guards import ReplyGuards
from server.progress import PROGRESS

log = logging.getLogger("flwr.fedxray")
STATS_TYPE, BUNDLE_TYPE = "query.stats", "evaluate.bundle"
RESULT_FILES = {"train": "federation.json", "stats": "stats.json", "evaluate": "crosssite.json"}
CARD_KEY = "crosssite"
POOLED = "pooled"
NODE_POLL = 1.0   # seconds between looks at the connected SuperNodes while too few are there


def run_job(grid: Grid, s: Settings, out: Path, run_id: int) -> dict:
    """Run `s.job` (stats or evaluate) on `grid`; writes and returns its result (RESULT_FILES[s.job])."""
    guarded = GuardedGrid(grid, min_nodes=s.federation.min_available_nodes, wait_timeout=s.federation.node_wait_timeout,
                          fp16=s.federation.fp16, guards=ReplyGuards(s.guards))
    t0 = time.perf_counter()
    nodes = connected_nodes(guarded)
    result = (federated_stats(guarded, nodes, s, out) if s.job == "stats" else cross_site(guarded, nodes, s, out, run_id))
    result.update(job=s.job, flower_run_id=run_id, seconds=round(time.perf_counter() - t0, 2),
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(out / RESULT_FILES[s.job], jsonable(result))
    return result


def connected_nodes(guarded: GuardedGrid, sleep=time.sleep) -> list[int]:
    """The connected SuperNodes once federation.min_available_nodes are there; NotEnoughNodes after
    federation.node_wait_timeout (GuardedGrid.get_node_ids)."""
    while True:
        ids = sorted(int(i) for i in guarded.get_node_ids())
        if len(ids) >= guarded.min_nodes:
            return ids
        sleep(NODE_POLL)


def _exchange(guarded: GuardedGrid, nodes: list[int], content: RecordDict, message_type: str, timeout: float
              ) -> dict[str, dict]:
    """One message to every node; {hospital: {"ok": True, "metrics": {...}} or {"ok": False, "code", "error"}}."""
    messages = [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]
    guarded.send_and_receive(messages, timeout=timeout)
    rows, _ = guarded.drain()
    out: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: _natural(who(r))):   # node ids are random: order by name
        name = who(row)
        out[name] = ({"ok": True, "metrics": row.get("metrics", {})} if row["ok"]
                     else {"ok": False, "code": row.get("code", "failed"), "error": row.get("error", "")})
    return out


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------------------ stats
def federated_stats(guarded: GuardedGrid, nodes: list[int], s: Settings, out: Path) -> dict:
    config = ConfigRecord({"findings": list(s.data.findings)} if s.data.findings else {})
    replies = _exchange(guarded, nodes, RecordDict({"config": config}), STATS_TYPE, s.federation.round_timeout)
    hospitals = {site: (_stats_of(r["metrics"]) if r["ok"] else {k: v for k, v in r.items()})
                 for site, r in replies.items()}
    findings = list(dict.fromkeys(f for h in hospitals.values() if h["ok"] for sp in h["splits"].values()
                                  for f in sp["positive"]))
    result = {"hospitals": hospitals, "findings": findings, "local_split": s.federation.local_split,
              "suppression": "counts below each hospital's own min-count k (its site policy; 0 included) are "
                             "shown as \"<k\""}
    result["flags"] = stats_flags(result)
    write_atomic(out / "stats.md", lambda tmp: Path(tmp).write_text(format_stats_table(result)))
    ok = sum(h["ok"] for h in hospitals.values())
    log.info("%sstats: %d of %d hospitals answered; %d flags", PROGRESS, ok, len(hospitals), len(result["flags"]))
    return result


def _stats_of(metrics: dict) -> dict:
    """A stats reply's flat MetricRecord -> nested, each count rendered (an int, or "<k")."""
    k = int(metrics.get(MIN_COUNT_KEY, 0))
    splits: dict[str, dict] = {}
    excluded: dict[str, int | str] = {}
    for key, value in metrics.items():
        parts = key.split("/", 2)
        if parts[0] == "excluded" and len(parts) == 2:
            excluded[parts[1]] = render_count(value, k)
        elif len(parts) >= 2 and parts[0] in ("train", "val", "test"):
            sp = splits.setdefault(parts[0], {"images": None, "patients": None, "positive": {}, "view": {}, "size": {}})
            if len(parts) == 2:
                sp[parts[1]] = render_count(value, k)
            else:
                sp.setdefault(parts[1], {})[parts[2]] = render_count(value, k)
    return {"ok": True, "min_count": k, "splits": splits, "excluded": excluded}


def stats_flags(stats: dict) -> list[str]:
    """What a coordinator should see before training: a finding a hospital does not label, or for which a split
    with images has fewer than k positives ("<k": none or few), and hospitals that did not answer."""
    flags = []
    for site, h in stats["hospitals"].items():
        if not h["ok"]:
            flags.append(f"{site}: no statistics ({h['code']})")
            continue
        for split, sp in h["splits"].items():
            if not isinstance(sp.get("images"), int):
                continue   # an empty or tiny split (e.g. no test split with local_split=train-val): nothing to flag
            for f in stats["findings"]:
                v = sp["positive"].get(f)
                if v is None:
                    flags.append(f"{site}: does not label {f}")
                elif isinstance(v, str):
                    flags.append(f"{site}: {v} positives for {f} in {split} (none or few)")
    return list(dict.fromkeys(flags))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows])


def format_stats_table(stats: dict) -> str:
    """stats.json as Markdown: hospital x split x finding positives, view mix, image sizes, exclusions, flags."""
    ok = {site: h for site, h in stats["hospitals"].items() if h["ok"]}
    findings = stats["findings"]
    lines = ["# Federated data statistics", "",
             f"Each hospital's own patient-level split (federation.local_split={stats.get('local_split', '')}); "
             "aggregate counts only. A count below the hospital's threshold k, zero included, is shown as \"<k\".",
             "", "## Images, patients and positives per finding", ""]

    def split_rows(part: str, keys: list[str]) -> list[list]:
        return [[site, split] + [sp.get(part, {}).get(k, "") for k in keys]
                for site, h in ok.items() for split, sp in h["splits"].items()]

    lines += _table(["hospital", "split", "images", "patients", *findings],
                    [[site, split, sp["images"], sp["patients"], *[sp["positive"].get(f, "-") for f in findings]]
                     for site, h in ok.items() for split, sp in h["splits"].items()])
    lines += ["", "## View mix", ""] + _table(["hospital", "split", *VIEWS], split_rows("view", list(VIEWS)))
    bins = [name for _, _, name in SIZE_BINS]
    lines += ["", "## Original image size (shorter side, px)", ""] + _table(["hospital", "split", *bins],
                                                                           split_rows("size", bins))
    codes = sorted({c for h in ok.values() for c in h["excluded"] if c != "total"})
    lines += ["", "## Images excluded by the data layer, by reason", ""] + _table(
        ["hospital", "k", "total", *codes],
        [[site, h["min_count"], h["excluded"].get("total", ""), *[h["excluded"].get(c, 0) for c in codes]]
         for site, h in ok.items()])
    failed = {site: h for site, h in stats["hospitals"].items() if not h["ok"]}
    if failed:
        lines += ["", "## Hospitals without statistics", ""] + [f"- {site}: {h['code']} ({h['error']})"
                                                                 for site, h in failed.items()]
    lines += ["", "## Flags", ""] + ([f"- {f}" for f in stats["flags"]] or ["- none"])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ cross-site
def cross_site(guarded: GuardedGrid, nodes: list[int], s: Settings, out: Path, run_id: int) -> dict:
    rows = []
    for path in s.crosssite.bundles:
        p = Path(path).expanduser().resolve()
        row: dict = {"bundle": _label(p), "path": str(p)}
        try:
            bundle = load_bundle(p)
        except FedxrayError as e:   # the server's own file: its message may name it
            rows.append({**row, "error": str(e), "hospitals": {}, POOLED: None})
            log.error("cross-site: bundle %s cannot be loaded: %s", p, e)
            continue
        content = RecordDict({"arrays": state_to_record(bundle.model), BUNDLE_RECORD: bundle_config(bundle)})
        replies = _exchange(guarded, nodes, content, BUNDLE_TYPE, s.federation.round_timeout)
        hospitals = {site: (_scores(r["metrics"], bundle.findings) if r["ok"] else r) for site, r in replies.items()}
        row.update(model_id=bundle.model_id, findings=bundle.findings,
                   thresholds=dict(zip(bundle.findings, [float(t) for t in bundle.thresholds])),
                   hospitals=hospitals, **{POOLED: pooled(hospitals)})
        record = {"evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "flower_run_id": run_id,
                  "operating_point": "the bundle's own thresholds", "split": "each hospital's own test split",
                  "hospitals": {site: ({"split": h["split"], "num_examples": h["num_examples"], **h["macro"]}
                                       if h["ok"] else {"code": h["code"]}) for site, h in hospitals.items()},
                  POOLED: row[POOLED]}
        update_card(p, CARD_KEY, record)
        rows.append(row)
    sites = list(dict.fromkeys(site for r in rows for site in r["hospitals"]))
    result = {"metric": s.crosssite.heatmap_metric, "hospitals": sites, "bundles": rows,
              "operating_point": "each bundle's own thresholds (its model card): the deployed operating point",
              "split": "each hospital's own test split (its patient-level split as training makes it; its "
                       "validation patients where federation.local_split=train-val gives it no test split)",
              "pooled": "mean over the hospitals that answered, weighted by their examples (predictions never "
                        "leave a hospital, so this is not the metric of the pooled predictions)"}
    write_atomic(out / "crosssite.md", lambda tmp: Path(tmp).write_text(format_crosssite_table(result)))
    _heatmap(result, out / "crosssite.png")
    log.info("%scross-site: %d bundles x %d hospitals -> %s", PROGRESS, len(rows), len(sites), out / "crosssite.json")
    return result


def _label(p: Path) -> str:
    """A row name: the bundle folder, with its run folder when it is the usual <run>/bundle."""
    return f"{p.parent.name}/{p.name}" if p.name == "bundle" else p.name


def _scores(metrics: dict, findings: list[str]) -> dict:
    split = "test" if any(k.startswith("test-") for k in metrics) else "val"

    def num(key: str):
        v = metrics.get(key)
        return None if v is None or not math.isfinite(float(v)) else float(v)

    return {"ok": True, "split": split, "num_examples": int(metrics.get("num-examples", 0)),
            "macro": {m: num(f"{split}-{m}") for m in METRICS},
            "per_finding": {f: {m: num(f"{split}-{m}/{f}") for m in METRICS} for f in findings}}


def pooled(hospitals: dict[str, dict]) -> dict | None:
    """Each macro metric averaged over the hospitals that defined it, weighted by their examples."""
    ok = [h for h in hospitals.values() if h["ok"] and h["num_examples"] > 0]
    if not ok:
        return None
    macro = {}
    for m in METRICS:
        pairs = [(h["num_examples"], h["macro"][m]) for h in ok if h["macro"][m] is not None]
        macro[m] = sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else None
    return {"num_examples": sum(h["num_examples"] for h in ok), "hospitals": len(ok), "macro": macro}


def _cell(h: dict | None, metric: str) -> str:
    if h is None:
        return "-"
    if not h.get("ok", True):
        return h["code"]
    v = h["macro"][metric]
    return "n/a" if v is None else f"{v:.3f}"


def format_crosssite_table(result: dict) -> str:
    """crosssite.json as Markdown: one bundle x hospital (+ pooled) table per macro metric, then examples."""
    sites = result["hospitals"]
    lines = ["# Cross-site evaluation", "",
             f"Split: {result['split']}. Operating point: {result['operating_point']}. Pooled: {result['pooled']}.",
             "A cell with a code is a hospital that failed (client/boundary.py's vocabulary)."]
    names = [f"{r['bundle']} ({r.get('model_id', 'not loaded')})" for r in result["bundles"]]
    for m in METRICS:
        lines += ["", f"## {m} (macro)", ""]
        lines += _table(["bundle", *sites, POOLED],
                        [[name, *[_cell(r["hospitals"].get(s), m) for s in sites],
                          _cell(r[POOLED], m) if r.get(POOLED) else ("bundle error" if r.get("error") else "-")]
                         for name, r in zip(names, result["bundles"])])
    lines += ["", "## Examples scored", ""]
    lines += _table(["bundle", *sites, POOLED],
                    [[name, *[(h["num_examples"] if h["ok"] else h["code"]) if (h := r["hospitals"].get(s)) else "-"
                              for s in sites], (r.get(POOLED) or {}).get("num_examples", "-")]
                     for name, r in zip(names, result["bundles"])])
    errors = [f"- {r['bundle']}: {r['error']}" for r in result["bundles"] if r.get("error")]
    if errors:
        lines += ["", "## Bundles not evaluated", "", *errors]
    return "\n".join(lines) + "\n"


def _heatmap(result: dict, path: Path) -> Path:
    m, sites = result["metric"], result["hospitals"]
    cols = [*sites, POOLED]
    values, labels = [], []
    for r in result["bundles"]:
        cells = [r["hospitals"].get(s) for s in sites] + [r.get(POOLED)]
        values.append([c["macro"][m] if c and c.get("ok", True) else None for c in cells])
        labels.append([_cell(c, m) for c in cells])
    return plot_heatmap(values, [r["bundle"] for r in result["bundles"]], cols, path, labels=labels,
                        title=f"Cross-site macro {m} (bundle x hospital)")


def format_result(result: dict) -> str:
    """The table of any job's result file (status.json's `result`), for whoever prints it."""
    job = result.get("job", "train")
    return (format_stats_table(result) if job == "stats" else format_crosssite_table(result) if job == "evaluate"
            else result.get("table", ""))


__all__ = ["run_job", "RESULT_FILES", "format_result", "format_stats_table", "format_crosssite_table", "stats_flags",
           "connected_nodes", "NotEnoughNodes"]
