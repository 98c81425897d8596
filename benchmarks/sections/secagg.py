"""What SecAgg+ costs a round, by model size, on the product's own path, and that its aggregate is FedAvg's.

For smallcnn, resnet18 and resnet50: the same tiny federation on Flower's simulation runtime
(`server.federation.run_federated_simulation`, 3 synthetic hospitals, 32 px, the demo profile made small so
that training is a small part of a round) once with plain FedAvg and once with `secagg.enabled=true`
(server/secagg.py drives Flower's `SecAggPlusWorkflow`, client/mods.py Flower's `secaggplus_mod`), each in a
fresh interpreter, same seeds:

- seconds per round, the median of rounds 2 and 3 (federation.json's history: training, aggregation, global
  evaluation, checkpoint; round 1 also holds the Ray workers' warm-up), SecAgg+ over FedAvg;
- bytes per client in the last round, down and up (every round's in the note), as the product records them
  in federation.json's history (`bytes_per_client`, server/grid.py: per hospital, every train-type message
  of the round, all four SecAgg+ stages included, merged per hospital by server/secagg.py);
- peak RSS of the worker process (ServerApp and the simulation driver; the ClientApps run in Ray workers and
  are not counted);
- the global weights after round 1, |w_secagg - w_fedavg| per float array against the error SecAgg+'s
  quantisation implies for that array (`quantisation_bound` x the array's scale, client/mods.py
  `secagg_scales`, read from the product's own `apply_update` in round 1; the ratio must be <= 1), for the
  array nearest its bound and for the BatchNorm running statistics, with the values the hospitals report
  clipped. Both runs start from the same
  initial model and the hospitals train with the same seeds (client/app.py `_seed`); that this makes local
  training deterministic is measured, not assumed: smallcnn's FedAvg run is repeated and its round-1 weights
  compared.

The checkpoint keeps only the latest global weights, so the worker copies global-r0001 aside as soon as the
product has written it (a wrapper around `Checkpoint.save` that calls it unchanged, then copies the file).

--quick (the suite's smoke test) runs no simulation (two Ray start-ups cost ~1 min): it prints the same rows
with no figure, plus the bound for the quick settings.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.sections._federation import fresh, small_settings
from benchmarks.suite import Row
from common.models import is_running_statistic

ARCHS = ("smallcnn", "resnet18", "resnet50")
HOSPITALS, PATIENTS, ROUNDS = 3, 20, 3


def _overrides(arch: str, secagg: bool, max_weight: float) -> dict:
    """The two arms differ only by secagg.enabled; max_weight ~ the largest hospital (settings' advice). No
    federated evaluation in either: the SecAgg+ path has none (server/secagg.py), so FedAvg's rounds would
    otherwise hold an evaluate stage SecAgg+'s do not."""
    return {"model.arch": arch, "secagg.enabled": secagg, "secagg.max_weight": max_weight,
            "federation.fraction_evaluate": 0.0,
            "federation.node_wait_timeout": 120.0, "federation.round_timeout": 600.0}


def sim_worker(data: str, out: str, arch: str, mode: str, rounds: int, max_weight: float) -> dict:
    """One federated simulation in this fresh process: round seconds, stage bytes, peak RSS, round-1 weights."""
    import server.secagg as secagg
    from benchmarks._util import peak_rss_mb
    from client.mods import secagg_scales
    from server.checkpoint import Checkpoint
    from server.federation import run_federated_simulation

    kept = Path(out) / "round1"
    save = Checkpoint.save

    def keep_round1(self, state, *args, **kwargs):   # the product's save, unchanged; then copy round 1 aside
        save(self, state, *args, **kwargs)
        if state.rounds_done == 1:
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.dir / state.files["global"], kept / "global.safetensors")

    apply_update, scales = secagg.apply_update, {}

    def scales_of_round1(global_arrays, aggregate, names):   # the product's step, unchanged; round 1's scales kept
        if not scales:
            scales.update(secagg_scales(dict(zip(names, global_arrays.to_numpy_ndarrays(), strict=True))))
        return apply_update(global_arrays, aggregate, names)

    Checkpoint.save, secagg.apply_update = keep_round1, scales_of_round1
    s = small_settings(data, out, rounds, _overrides(arch, mode == "secagg", max_weight))
    summary = run_federated_simulation(s, num_supernodes=HOSPITALS)
    fed = summary["provenance"]["federation"]
    rows = [h for h in summary["history"] if "clients" in h]
    return {"seconds": [h["seconds"] for h in rows],
            "bytes": [h["bytes_per_client"] for h in rows], "examples": fed["examples_per_node"],
            "round1_metrics": {c["site"]: c["metrics"] for c in rows[0]["clients"]["train"] if c["ok"]},
            "peak_rss_mb": peak_rss_mb(), "round1": str(kept / "global.safetensors"), "scales": scales}


def quantisation_bound(examples: list[int], max_weight: float, clipping_range: float,
                       quantization_range: int = 2**22, max_abs: float = 0.0, scale: float = 1.0) -> float:
    """Largest |w_secagg - w_fedavg| per weight Flower's SecAgg+ (1.42) allows after one aggregation, for
    values whose weighted value r_h * w stays within +/- clipping_range (beyond it they are clipped). The
    product masks updates divided by a per-array `scale` (client/mods.py secagg_scales): the rounding term
    is in those units, so it is multiplied by the array's scale.

    Hospital h: r_h = q_h / T, q_h = round(n_h / max_weight * T), T = quantization_range (secaggplus_mod);
    it uploads stochastic_round((r_h w_h + C) T / 2C), off by < 1 level = 2C / T. The server sums, maps back
    (x 2C/T - C each) and divides by sum(r_h) (SecAggPlusWorkflow.unmask_stage), so the rounding adds
    < H * 2C / sum(q_h) (H hospitals), and weighting by r_h instead of FedAvg's n_h / N moves the average by
    <= sum_h |q_h / sum q - n_h / N| * max|w|. A float32 term (2^-22 * max|w|) covers FedAvg's own rounding.
    """
    t = quantization_range
    q = [round(n / max_weight * t) for n in examples]
    total, n_total = sum(q), sum(examples)
    rounding = len(examples) * 2 * clipping_range / total
    weighting = sum(abs(qh / total - n / n_total) for qh, n in zip(q, examples)) * max_abs
    return rounding * scale + weighting + 2.0**-22 * max_abs


def compare(a_path: str, b_path: str) -> dict:
    """max |a - b| per float array (SecAgg+ also quantises the integer counters, rounded back exactly), and
    max |a| over them."""
    import numpy as np
    from safetensors.numpy import load_file

    a, b = load_file(a_path), load_file(b_path)
    floats = [k for k in a if np.dtype(a[k].dtype).kind == "f"]
    per = {k: float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in floats}
    return {"diff": max(per.values()), "per_array": per,
            "max_abs": max(float(np.abs(a[k]).max()) for k in floats), "weights": sum(a[k].size for k in floats),
            "dtypes": sorted({str(b[k].dtype) for k in b})}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def _arch_rows(arch: str, runs: dict, clip: float, max_weight: float) -> list[Row]:
    fa, sa = runs["fedavg"], runs["secagg"]
    examples = [int(sa["examples"][k]) for k in sorted(sa["examples"])]
    c = compare(fa["round1"], sa["round1"])
    bounds = {k: quantisation_bound(examples, max_weight, clip, max_abs=c["max_abs"], scale=sa["scales"][k])
              for k in c["per_array"]}
    ratios = {k: v / bounds[k] for k, v in c["per_array"].items()}
    worst = max(ratios, key=ratios.get)
    over = sorted(((k, r) for k, r in ratios.items() if r > 1), key=lambda kv: -kv[1])
    stats = [k for k in ratios if is_running_statistic(k)]
    worst_stat = max(stats, key=ratios.get) if stats else None
    clipped = {site: int(m.get("secagg-clipped", 0)) for site, m in sa["round1_metrics"].items()}
    last = len(sa["bytes"]) - 1
    per_round = lambda run, way: [b[way] for b in run["bytes"]]  # noqa: E731
    settings = (f"num-examples {examples}, secagg.max_weight {max_weight:g}, clipping_range {clip:g}, 2^22 "
                f"levels, max|w| {c['max_abs']:.3g}")
    out = [Row(what=f"seconds per round (median of rounds 2-{len(sa['seconds'])}), SecAgg+, {arch}, "
                    f"{HOSPITALS} hospitals", ours=_median(sa["seconds"][1:]), unit="s",
               reference=_median(fa["seconds"][1:]), reference_what="plain FedAvg, same rounds",
               note=f"every round: SecAgg+ {sa['seconds']} s, FedAvg {fa['seconds']} s (round 1: Ray workers' "
                    "warm-up)", detail={"secagg": sa, "fedavg": fa}),
           Row(what=f"bytes per client, round {last + 1}, down (every stage), SecAgg+, {arch}",
               ours=sa["bytes"][last]["down"], unit="B", reference=fa["bytes"][last]["down"],
               reference_what="plain FedAvg", note=f"every round: SecAgg+ {per_round(sa, 'down')}, FedAvg "
               f"{per_round(fa, 'down')}"),
           Row(what=f"bytes per client, round {last + 1}, up (every stage), SecAgg+, {arch}",
               ours=sa["bytes"][last]["up"], unit="B", reference=fa["bytes"][last]["up"], reference_what="plain FedAvg",
               note=f"every round: SecAgg+ {per_round(sa, 'up')}, FedAvg {per_round(fa, 'up')}"),
           Row(what=f"peak RSS, ServerApp process, SecAgg+, {arch}", ours=sa["peak_rss_mb"], unit="MiB",
               reference=fa["peak_rss_mb"], reference_what="plain FedAvg"),
           Row(what=f"max |w_secagg - w_fedavg| after round 1, the array nearest its bound, {arch}",
               ours=c["per_array"][worst], unit="", reference=bounds[worst],
               reference_what=f"SecAgg+ quantisation bound of {worst}", goal_max=1.0,
               note=f"{len(over)} of {len(ratios)} float arrays over their bound"
                    + (f" ({', '.join(f'{k} {r:.2g}x' for k, r in over[:4])}{', ...' if len(over) > 4 else ''})"
                       if over else "")
                    + f"; values the hospitals clipped (secagg-clipped): {clipped}; global dtypes {c['dtypes']}; "
                    f"max over every array {c['diff']:.3g}; bound from {settings}, x each array's scale",
               detail={k: v for k, v in c.items() if k != "per_array"} | {"over_bound": dict(over),
                                                                             "clipped": clipped}),
           *([Row(what=f"max |w_secagg - w_fedavg| after round 1, BatchNorm running statistics, {arch}",
                  ours=c["per_array"][worst_stat], unit="", reference=bounds[worst_stat],
                  reference_what=f"SecAgg+ quantisation bound of {worst_stat}", goal_max=1.0,
                  note="the running statistics alone (4x the scale of a weight: client/mods.py)")]
             if worst_stat else [])]
    if "fedavg-again" in runs:
        again = compare(fa["round1"], runs["fedavg-again"]["round1"])
        out.append(Row(what=f"max |w_fedavg - w_fedavg| after round 1, FedAvg run twice (determinism), {arch}",
                       ours=again["diff"], unit="", reference=min(bounds.values()), reference_what="SecAgg+ quantisation bound",
                       note=("bit-identical" if again["diff"] == 0 else
                             "not bit-identical: same seeds, a float32 rounding-level "
                             "difference between two runs; the SecAgg+ comparison cannot resolve below it"),
                       detail={k: v for k, v in again.items() if k != "per_array"}))
    return out


def rows(quick: bool) -> list[Row]:
    from common.data.synthetic import synthesize
    from common.settings import SecAggConfig

    clip = SecAggConfig().clipping_range
    if quick:   # the rows' shape and the bound only: no Ray start-up in the suite's smoke test
        bound = quantisation_bound([12, 14, 16], 20.0, clip, max_abs=1.0)
        return [Row(what=f"{w} (--quick: no simulation run)", ours=None, unit=u, note="run without --quick")
                for w, u in (("seconds per round, SecAgg+ vs plain FedAvg", "s"),
                             ("bytes per client per round, SecAgg+ vs plain FedAvg", "B"),
                             ("max |w_secagg - w_fedavg| after round 1", ""))] + [
            Row(what="SecAgg+ quantisation bound, 3 hospitals of 12-16 examples, max_weight 20, max|w| 1, "
                     "an array of scale 1 (a weight array with max|w| <= 1)",
                ours=bound, unit="")]
    out: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedxray-bench-secagg-") as tmp:
        data = Path(tmp) / "data"
        written = synthesize(data, hospitals=HOSPITALS, patients=PATIENTS, size=64, seed=4, progress=False)
        max_weight = float(max(v for k, v in written.items() if k.startswith("hospital_")))  # >= any num-examples
        for arch in ARCHS:
            modes = ("fedavg", "secagg") + (("fedavg-again",) if arch == ARCHS[0] else ())
            runs = {mode: fresh("benchmarks.sections.secagg", str(data), str(Path(tmp) / arch / mode), arch,
                                mode.split("-")[0], str(ROUNDS), str(max_weight), what=f"{arch} {mode}")
                    for mode in modes}
            out += _arch_rows(arch, runs, clip, max_weight)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-worker":
        data, out, arch, mode, rounds, max_weight = sys.argv[2:8]
        print(json.dumps(sim_worker(data, out, arch, mode, int(rounds), float(max_weight))))
