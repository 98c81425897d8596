"""The aggregator's Flower ServerApp: Flower's strategy drives the rounds; this module adds what a clinic needs
around it: global evaluation on held-out data every round, best-round selection on validation (`train.select_on`),
a checkpoint after every round (and resumption from it), bounded waits, and the exported model bundle.

Output directory (`output_dir`): bundle/ (served by `fedxray serve`), federation.json (summary + per-round
history), status.json (running / done / failed + message; `result` names the result file), checkpoint/.
The run config's `job` can also ask for data statistics or a cross-site evaluation instead (server/jobs.py).
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.arrays import load_record, state_to_record
from client.boundary import DECLINES
from common.settings import Settings
from common.bundle import save_bundle, warm_start_provenance
from common.calibration import calibrate
from common.errors import FedxrayError
from common.fileio import write_json
from common.metrics import format_headline_table
from common.models import build_model
from common.training import SELECTION_RULES, seed_everything, selection_key
from server.checkpoint import Checkpoint, RunState, numpy_to_record, record_to_numpy
from server.evaluation import GlobalEval, GlobalEvaluator
from server.progress import PROGRESS
from server.grid import EVALUATE, REJECTED, TRAIN, GuardedGrid, who
from server.guards import ReplyGuards
from server.jobs import RESULT_FILES, run_job
from server.privacy import provenance as privacy_provenance
from server.privacy import record_round, worst_epsilon, wrap_central_dp
from server.strategies import build_strategy, export_state, restore_state, strategy_params

log = logging.getLogger("flwr.fedxray")
SUMMARY_FILE, STATUS_FILE = RESULT_FILES["train"], "status.json"


def write_status(out: Path, state: str, **info) -> None:
    write_json(out / STATUS_FILE, {"state": state, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    **info})


class RoundKeeper:
    """Flower's `evaluate_fn`: global evaluation, best-round bookkeeping and the checkpoint of each round."""

    def __init__(self, s: Settings, evaluator: GlobalEvaluator, grid: GuardedGrid, strategy, ckpt: Checkpoint,
                 state: RunState, best_arrays: dict | None, out: Path):
        self.s, self.evaluator, self.grid, self.strategy, self.ckpt = s, evaluator, grid, strategy, ckpt
        self.state, self.best_arrays, self.out = state, best_arrays, out
        self.offset = state.rounds_done
        self._t = time.perf_counter()

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        g = self.offset + local_round
        if local_round == 0 and self.offset > 0:
            return None  # resumed: round `offset` was evaluated before the restart
        ev = self.evaluator(g, arrays, self.s.train.threshold_method)
        row = {"round": g, "global": ev.row()}
        if local_round > 0:
            replies, bytes_down = self.grid.drain()
            _require_updates(g, replies)
            row.update(self._clients(replies, bytes_down, g))
            row["seconds"] = round(time.perf_counter() - self._t, 3)
            self._update_best(ev, arrays)
            self.state.rounds_done = g
        self.state.history.append(row)
        if local_round > 0:
            self.ckpt.save(self.state, record_to_numpy(arrays), self.best_arrays, export_state(self.strategy),
                           best_changed=self.state.best_round == g)
            write_status(self.out, "running", round=g, rounds=self.s.federation.rounds)
        self._t = time.perf_counter()
        v = ev.val["macro"]
        log.info("%s", self._progress(row))
        nan = float("nan")
        # what Flower prints in its round summary: validation only (the test split reports the selected round)
        return MetricRecord({"val-f1": v["f1"] if v["f1"] is not None else nan,
                             "val-auc": v["auc"] if v["auc"] is not None else nan})

    def _progress(self, row: dict) -> str:
        """The per-round line an operator watches (the launcher prints the lines carrying PROGRESS): round,
        which hospitals trained and which did not (site and reason code), validation metrics, seconds.
        Test metrics are reported once, for the round validation selects."""
        g, n = row["round"], self.s.federation.rounds
        v = row["global"]["val"]
        parts = [f"round {g}/{n}" + (" (initial model)" if "clients" not in row else "")]
        if "clients" in row:
            train = row["clients"]["train"]
            ok = [r for r in train if r["ok"]]
            missing = [f"{who(r)}: {r.get('code', 'failed')}" for r in train if not r["ok"]]
            parts.append(f"{len(ok)} of {len(train)} hospitals trained" + (f" ({'; '.join(missing)})" if missing
                                                                             else ""))
        best = "  (best so far)" if self.state.best_round == g and g else ""
        parts.append(f"val AUC {_fmt(v['auc'])} F1 {_fmt(v['f1'])}{best}")
        if "seconds" in row:
            parts.append(f"{row['seconds']:.1f} s")
        return PROGRESS + " | ".join(parts)

    def _update_best(self, ev: GlobalEval, arrays: ArrayRecord) -> None:
        m = ev.val["macro"]
        key = list(selection_key(self.s.train.select_on, m["f1"], m["auc"], ev.val.get("loss")))
        if key > self.state.best_key:   # [] (nothing kept yet) sorts below any key
            self.state.best_round, self.state.best_key = ev.round, key
            self.state.best_thresholds = [float(x) for x in ev.thresholds]
            self.state.best_metrics = {"validation": ev.val, "test": ev.test}
            self.best_arrays = record_to_numpy(arrays)

    def _clients(self, replies: list[dict], bytes_down: list[tuple[int, str, int]], g: int) -> dict:
        train = [r for r in replies if r["type"] == TRAIN]
        evals = [r for r in replies if r["type"] == EVALUATE]
        for r in train:
            if not r["ok"]:
                continue
            node = self.state.nodes.setdefault(r["site"] or str(r["node_id"]),
                                               {"node_ids": [], "rounds": [], "examples": 0})
            if r["node_id"] not in node["node_ids"]:
                node["node_ids"].append(r["node_id"])
            node["rounds"].append(g)
            node["examples"] = int(r["metrics"].get("num-examples", 0))
        ups = [r["bytes_up"] for r in train if "bytes_up" in r]
        down: dict[int, int] = {}   # per hospital: every train message of the round (SecAgg+ sends four)
        for node_id, kind, n in bytes_down:
            if kind == TRAIN:
                down[node_id] = down.get(node_id, 0) + n
        privacy = record_round(self.state.nodes, train, g)  # epsilon per hospital this round (DP-SGD only)
        return {"clients": {"train": train, "evaluate": evals},
                "bytes_per_client": {"down": int(sum(down.values()) / len(down)) if down else 0,
                                     "up": int(sum(ups) / len(ups)) if ups else 0},
                **({"privacy": privacy} if privacy else {})}


def _require_updates(g: int, replies: list[dict]) -> None:
    """A round without a single model update means the federation is broken: stop instead of going on."""
    train = [r for r in replies if r["type"] == TRAIN]
    if any(r["ok"] for r in train):
        return
    failed = [r for r in train if not r["ok"]]
    first = failed[0] if failed else None
    every = "; ".join(f"{who(r)}: {r.get('error', '')}" for r in failed)
    codes = {r.get("code") for r in failed}
    if failed and codes == {"dp-budget-spent"}:
        raise FedxrayError(f"round {g}: every hospital declined to train because its privacy budget is spent "
                           f"({who(first)}: {first.get('error', '')}); the run ends here. More rounds need a larger "
                           "privacy.target_epsilon, which only the hospitals can agree to")
    if failed and codes <= set(DECLINES):
        raise FedxrayError(f"round {g}: every hospital refused this run under its site policy or privacy budget "
                           f"({every}); change the run config to what the hospitals allow")
    if failed and codes == {"rejected"}:
        raise FedxrayError(f"round {g}: the server rejected every hospital's update, the first because "
                           f"{first['error'][len(REJECTED):]}. If the weights did not fit, do all SuperNodes run this "
                           "version of the app with the same arch, findings and channels? If a guard rejected them "
                           "(guard-*), look at what changed at the hospitals. The run resumes from its checkpoint")
    detail = f"{len(failed)} failed: {every}" if failed else "no replies within federation.round_timeout"
    raise FedxrayError(f"round {g}: no hospital returned a model update ({detail}); fix the cause on the "
                       "SuperNodes (their logs have the detail under the incident id) and restart: the run resumes "
                       "from its checkpoint")


def _contributors(state: RunState, g: int) -> list[str]:
    """The hospitals whose updates made round g's model (the final table counts only those)."""
    row = next((h for h in state.history if h["round"] == g), {})
    return sorted({who(r) for r in row.get("clients", {}).get("train", []) if r["ok"]})


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _resume_or_start(s: Settings, ckpt: Checkpoint, model) -> tuple[RunState, ArrayRecord, dict | None, dict]:
    loaded = ckpt.load(s.fingerprint(), s.federation.rounds) if s.federation.resume else None
    if loaded is None:
        return RunState(fingerprint=s.fingerprint()), state_to_record(model), None, {}
    state, glob, best, strat = loaded
    log.info("resuming from %s: %d of %d rounds done", ckpt.dir, state.rounds_done, s.federation.rounds)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def model_shapes(arrays: dict) -> dict:   # checkpoints from before 0-d arrays kept their shape hold (1,)
        return {k: v.reshape(shapes[k]) if k in shapes and v.size == math.prod(shapes[k]) else v
                for k, v in arrays.items()}

    return state, numpy_to_record(model_shapes(glob)), best and model_shapes(best), strat


def run_server(grid: Grid, run_config: dict, overrides: dict | None = None, run_id: int = 0) -> dict:
    """The run config's job on `grid` (`job`: train, stats or evaluate; server/jobs.py for the last two); returns
    its result, also written to <output_dir>/status.json's `result` file (federation.json for training)."""
    s = Settings.from_run_config(run_config, overrides)
    out = Path(s.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_status(out, "starting", run_id=run_id, job=s.job)
    try:
        summary = _run(grid, s, out, run_id) if s.job == "train" else run_job(grid, s, out, run_id)
    except Exception as e:
        log.error("federated %s failed: %s", "run" if s.job == "train" else f"{s.job} job", e)
        write_status(out, "failed", run_id=run_id, job=s.job, message=str(e), error=type(e).__name__)
        raise
    done = {"bundle": summary["bundle"], "best_round": summary["best_round"]} if s.job == "train" else {}
    write_status(out, "done", run_id=run_id, job=s.job, result=RESULT_FILES[s.job], **done)
    return summary


def _run(grid: Grid, s: Settings, out: Path, run_id: int) -> dict:
    t0 = time.perf_counter()
    evaluator = GlobalEvaluator(s)
    findings = evaluator.findings
    seed_everything(s.train.seed)  # the initial global model is reproducible (runs with equal settings are comparable)
    model = build_model(s.network, len(findings), s.preprocess.channels)
    ckpt = Checkpoint(out)
    state, initial, best_arrays, strat_state = _resume_or_start(s, ckpt, model)
    state.run_ids.append(int(run_id))
    strategy = wrap_central_dp(build_strategy(s), s)
    restore_state(strategy, strat_state, state.rounds_done)
    f = s.federation
    guarded = GuardedGrid(grid, min_nodes=max(f.min_available_nodes, f.min_train_nodes, f.min_evaluate_nodes),
                          wait_timeout=f.node_wait_timeout, fp16=f.fp16, guards=ReplyGuards(s.guards))
    keeper = RoundKeeper(s, evaluator, guarded, strategy, ckpt, state, best_arrays, out)
    shared = {"findings": findings, "round-offset": state.rounds_done, "fp16": s.federation.fp16}
    if s.secagg.enabled:
        from server.secagg import run_secagg

        run_secagg(guarded, s, initial, s.federation.rounds - state.rounds_done, shared, keeper)
    else:
        strategy.start(grid=guarded, initial_arrays=initial, num_rounds=s.federation.rounds - state.rounds_done,
                       timeout=s.federation.round_timeout, train_config=ConfigRecord(dict(shared)),
                       evaluate_config=ConfigRecord(dict(shared)), evaluate_fn=keeper)
    if keeper.best_arrays is None:
        raise FedxrayError("no round produced a model (every node failed or timed out); see the SuperNode logs")
    load_record(model, numpy_to_record(keeper.best_arrays))
    thresholds, metrics, calibration = _exported(s, evaluator, model, state)
    summary = _summary(s, state, evaluator, grid, run_id, time.perf_counter() - t0)
    summary["provenance"]["calibration"] = calibration
    summary.update(metrics)
    bundle = save_bundle(out / "bundle", model,
                         model_config=s.network,
                         preprocess=evaluator.cfg.preprocess, findings=findings, thresholds=thresholds,
                         metrics=metrics, provenance=summary["provenance"],
                         multilabel=evaluator.multilabel, validation=evaluator.datasets["val"],
                         test=evaluator.datasets.get("test"))
    summary["bundle"] = str(bundle)
    contributed = _contributors(state, state.best_round)
    summary["table"] = format_headline_table(
        {f"federated test (round {state.best_round})": metrics["test"]},
        title=f"Federated {s.federation.strategy}, {len(contributed)} hospitals in the selected round {state.best_round} "
              f"({', '.join(contributed)}), {state.rounds_done} rounds - server test split")
    write_json(out / SUMMARY_FILE, summary)
    # one line: the table itself is printed once, by whoever started the run (it is in federation.json)
    log.info("%sdone: round %d selected on validation, bundle %s", PROGRESS, state.best_round, bundle)
    return summary


def _exported(s: Settings, evaluator: GlobalEvaluator, model, state: RunState) -> tuple[list[float], dict, dict | None]:
    """(thresholds, {validation, test} metrics, calibration record) of the model the bundle will hold: the kept
    round as it was evaluated, or (train.calibration = platt or temperature) that round calibrated on the
    server's validation split (common/calibration.py) and evaluated again, thresholds tuned afresh. The
    per-round history stays the rounds as trained."""
    if s.train.calibration == "none":
        return state.best_thresholds, state.best_metrics, None
    calibration = calibrate(model, evaluator.loaders["val"], evaluator.findings, evaluator.multilabel,
                            s.train.calibration)
    ev = evaluator(state.best_round, state_to_record(model), s.train.threshold_method)
    log.info("%scalibrated round %d on validation (%s), validation ECE %.3f -> %.3f", PROGRESS, state.best_round,
             calibration["method"],
             state.best_metrics["validation"]["macro"]["ece"] or float("nan"), ev.val["macro"]["ece"] or float("nan"))
    return [float(x) for x in ev.thresholds], {"validation": ev.val, "test": ev.test}, calibration


def _summary(s: Settings, state: RunState, evaluator: GlobalEvaluator, grid: Grid, run_id: int,
             seconds: float) -> dict:
    compact = [{"round": h["round"], "val_f1": h["global"]["val"]["f1"], "val_auc": h["global"]["val"]["auc"],
                "test_f1": h["global"]["test"]["f1"], "test_auc": h["global"]["test"]["auc"],
                "clients": len([c for c in h.get("clients", {}).get("train", []) if c["ok"]])}
               for h in state.history]
    last = next((h for h in reversed(state.history) if "bytes_per_client" in h), {})
    federation = {
        "runtime": type(grid).__name__, "strategy": s.federation.strategy, "strategy_params": strategy_params(s),
        "rounds_planned": s.federation.rounds, "rounds_completed": state.rounds_done,
        "best_round": state.best_round,
        "selection": f"{SELECTION_RULES[s.train.select_on]} (server held-out validation split)",
        "nodes": state.nodes, "examples_per_node": {k: v["examples"] for k, v in state.nodes.items()},
        "local_epochs": s.federation.local_epochs, "fp16_transfer": s.federation.fp16,
        "bytes_per_client_per_round": last.get("bytes_per_client"),
        "dp": privacy_provenance(s, state.nodes), "epsilon": worst_epsilon(state.nodes),
        "secure_aggregation": "SecAgg+" if s.secagg.enabled else None, "history": compact, "run_ids": state.run_ids,
    }
    provenance = {
        "run_id": f"fed-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", "flower_run_id": run_id,
        "training": "federated", "federation": federation,
        "server_data": {"root": str(evaluator.path), "splits": evaluator.sizes()},
        "seconds": round(seconds, 2), "config": s.model_dump(mode="json"),
        "warm_start": warm_start_provenance(s.model.weights),
    }
    return {"best_round": state.best_round, "rounds_completed": state.rounds_done, "history": state.history,
            "validation": state.best_metrics["validation"], "test": state.best_metrics["test"],
            "provenance": provenance, "seconds": seconds}


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp; `overrides` (run-config keys) serve Python callers whose run config is empty."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, dict(context.run_config), overrides, run_id=int(context.run_id))

    return server_app


app = make_server_app()
