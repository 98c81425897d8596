"""Run an experiment: for each partition, every arm on the same protocol, each result saved as it finishes;
then results.json and report.md are (re)written from what is on disk, so a resumed run reports everything.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata
from pathlib import Path

from tqdm.auto import tqdm

from common.data.sources import load_manifest
from common.errors import FedxrayError
from common.process_memory import PeakMemory
from common.tracking import Tracker
from common.training import seed_everything
from simulations.arms import ARM_TYPES, ArmContext
from simulations.config import ArmConfig, SimulationConfig
from simulations.evaluation import Evaluator
from simulations.protocol import PartitionSpec, Protocol, build_protocol
from simulations.store import RESULTS_FILE, ResultStore, fingerprint, write_json

log = logging.getLogger(__name__)
SYNTHETIC_MARKER = "synthetic.json"   # the [synthetic] settings the folder was written with


def ensure_data(cfg: SimulationConfig) -> None:
    """Write the synthetic hospitals when the experiment asks for them and data.path is still empty. A folder
    that holds anything is used as it is: nothing is ever written into a user's own data."""
    if cfg.synthetic is None:
        return
    root, wanted = Path(cfg.data.path), cfg.synthetic.model_dump(mode="json")
    marker = root / SYNTHETIC_MARKER
    if root.is_dir() and any(root.iterdir()):
        if marker.is_file() and json.loads(marker.read_text()) != wanted:
            raise FedxrayError(f"{root} holds synthetic hospitals written with other [synthetic] settings "
                               f"({marker.read_text().strip()}); delete the folder or choose another data.path")
        return
    from common.data.synthetic import synthesize

    s = cfg.synthetic
    log.info("writing %d synthetic hospitals to %s", s.hospitals, root)
    synthesize(root, hospitals=s.hospitals, patients=s.patients, size=s.size, seed=s.seed,
               prevalence=s.prevalence, progress=False)
    marker.write_text(json.dumps(wanted) + "\n")


def planned_arms(cfg: SimulationConfig) -> list[tuple[ArmConfig, str | None]]:
    """Every arm after expansion (a dp entry becomes one arm per epsilon) with why it cannot run, if so."""
    out = []
    for spec in cfg.arms:
        kind = ARM_TYPES.get(spec.kind)
        if kind is None:
            raise ValueError(f"unknown arm kind {spec.kind!r}; known: {sorted(ARM_TYPES)}")
        for s in kind.expand(spec):
            replicates = [s] if not cfg.seeds or s.kind == "warm-start" else [
                s.model_copy(update={"label": f"{s.name}-seed{seed}", "seed": seed, "group": s.name})
                for seed in cfg.seeds]
            out += [(r, kind.unavailable(r)) for r in replicates]
    return out


def arm_settings(cfg: SimulationConfig, exp, proto: Protocol, spec: ArmConfig, *, progress: bool):
    """The experiment's settings as this arm trains with them: its replicate's seed, and the warm start (the
    GroupNorm network from the experiment's public-slice model) when the arm asks for it."""
    if spec.seed is not None:
        exp = exp.updated(**{"train.seed": spec.seed})
    if spec.warm_start:
        from simulations.warm_start import ensure_warm_start

        bundle = ensure_warm_start(cfg, proto, progress=progress)
        exp = exp.updated(**{"model.weights": str(bundle), "model.dp_compatible": True})
    return exp


def arm_fingerprint(cfg: SimulationConfig, part: PartitionSpec, spec: ArmConfig) -> str:
    """What a stored arm result must match to be reused on resume."""
    skip = {k: True for k in ("arms", "partitions", "output_dir", "name", "tensorboard", "seeds")}
    shared = cfg.model_dump(mode="json", exclude={**skip, "federation": {"cpus": True, "client_cpus": True}})
    return fingerprint(shared, part.__dict__, spec.model_dump(mode="json"))


def _environment() -> dict:
    versions = {}
    for pkg in ("torch", "flwr", "numpy", "scikit-learn", "tensorboard", "mlflow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "machine": platform.machine(), "packages": versions}


def arm_tracker(cfg: SimulationConfig, exp, partition: str, spec: ArmConfig, fp: str) -> Tracker:
    """One arm's run: TensorBoard under tensorboard/<partition>/<arm> (TensorBoard overlays the arms) and an
    MLflow run in the experiment's store, both off with `tensorboard = false`."""
    out = Path(cfg.output_dir)
    return Tracker(out, kind="simulate", name=f"{partition}/{spec.name}", experiment=cfg.name,
                   tensorboard=out / "tensorboard" / partition / spec.name if cfg.tensorboard else None,
                   mlflow=cfg.tensorboard, params={**exp.model_dump(mode="json"), "arm": spec.model_dump(mode="json")},
                   tags={"fedxray.partition": partition, "fedxray.arm": spec.name, "fedxray.arm_fingerprint": fp})


def run_partition(cfg: SimulationConfig, proto: Protocol, store: ResultStore, arms, *, progress: bool) -> dict:
    """All arms on one partition; returns {arm label: status line} for the console."""
    out, name = Path(cfg.output_dir), proto.spec.name
    write_json(out / "partitions" / f"{name}.json", proto.to_json())
    exp = cfg.experiment()
    evaluator: Evaluator | None = None
    status = {}
    for spec, why in tqdm(arms, desc=f"arms [{name}]", unit="arm", disable=None if progress else True):
        fp = arm_fingerprint(cfg, proto.spec, spec)
        if why:
            status[spec.name] = f"skipped: {why}"
            continue
        if store.finished(name, spec.name, fp):
            status[spec.name] = "already finished (resumed run: not rerun)"
            continue
        evaluator = evaluator or Evaluator(proto, exp, bootstrap=cfg.bootstrap, seed=cfg.seed)
        workdir = out / "work" / name / spec.name
        workdir.mkdir(parents=True, exist_ok=True)
        arm_exp = arm_settings(cfg, exp, proto, spec, progress=progress)
        tracker = arm_tracker(cfg, arm_exp, name, spec, fp)
        ctx = ArmContext(cfg, arm_exp, proto, evaluator, workdir, tracker, progress)
        seed_everything(arm_exp.train.seed, arm_exp.train.num_threads)
        t0 = time.perf_counter()
        try:
            with PeakMemory() as mem:
                result, preds = ARM_TYPES[spec.kind].run(ctx, spec)
        finally:
            tracker.close()
        result.update({"arm": spec.name, "kind": spec.kind, "partition": name, "status": "done", "fingerprint": fp,
                       "spec": spec.model_dump(mode="json"), "wall_s": round(time.perf_counter() - t0, 2),
                       "peak_rss_mb": mem.peak_mb, "hospitals_n": len(proto.hospitals)})
        result.setdefault("epsilon", None)
        store.save(name, spec.name, result, preds)
        status[spec.name] = f"done in {result['wall_s']:.0f} s"
    return status


def run_experiment(cfg: SimulationConfig, *, progress: bool = True, report: bool = True) -> dict:
    """Run (or resume) the whole experiment; returns results.json's content."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experiment.json", cfg.model_dump(mode="json"))
    ensure_data(cfg)
    arms = planned_arms(cfg)
    manifest = load_manifest(cfg.experiment().data)
    store = ResultStore(out)
    status: dict[str, dict] = {}
    for p in cfg.partitions:
        spec = PartitionSpec(p.method, p.alpha, cfg.federation.hospitals)
        proto = build_protocol(manifest, cfg.data, spec, cfg.federation.hospital_split, seed=cfg.seed,
                               public_fraction=cfg.warm_start.public_fraction if cfg.warm_start else 0.0)
        status[spec.name] = run_partition(cfg, proto, store, arms, progress=progress)
    results = collect(cfg, store, status)
    write_json(out / RESULTS_FILE, results)
    if report:
        from simulations.report import write_report
        write_report(out, results, store)
    return results


def collect(cfg: SimulationConfig, store: ResultStore, status: dict[str, dict]) -> dict:
    """results.json from the arm files on disk (only those matching this experiment's fingerprints)."""
    partitions = {}
    for p in cfg.partitions:
        spec = PartitionSpec(p.method, p.alpha, cfg.federation.hospitals)
        arms = {}
        for arm, why in planned_arms(cfg):
            r = store.finished(spec.name, arm.name, arm_fingerprint(cfg, spec, arm))
            arms[arm.name] = r if r else {"arm": arm.name, "kind": arm.kind, "status": "skipped" if why else "missing",
                                          "reason": why}
        partitions[spec.name] = {"partition_file": f"partitions/{spec.name}.json", "arms": arms,
                                 "status": status.get(spec.name, {})}
    f = cfg.federation
    return {
        "experiment": cfg.name, "config": cfg.model_dump(mode="json"), "environment": _environment(),
        "cost": {"epochs_per_image": f.epochs, "rounds": f.rounds, "local_epochs": f.local_epochs,
                 "statement": f"Cost matched: every arm sees each of its training images {f.epochs} times "
                              f"(centralised {f.epochs} epochs on the pooled images; federated {f.rounds} rounds x "
                              f"{f.local_epochs} local epoch(s); local-only {f.epochs} epochs per hospital)."},
        "protocol": ("global val/test: patient-level split of the source (official test kept); global train "
                     "partitioned into hospitals by patient; each hospital split by patient into its own train/val/"
                     f"test {list(f.hospital_split)}; centralised pools the hospitals' train splits"
                     + (f"; a public slice ({cfg.warm_start.public_fraction:g} of global train's patients, taken "
                        "before the hospitals were formed, so no hospital holds them) trains the warm start, declared "
                        f"as: {cfg.warm_start.statement}" if cfg.warm_start else "")),
        "partitions": partitions,
    }
