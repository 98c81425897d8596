"""What SecAgg+ adds per round, by model size: the numeric work of Flower's SecAgg+ on real model shapes.

    .venv/bin/python benchmarks/secagg_cost.py [--archs smallcnn,resnet18,resnet50] [--hospitals 3] [--shares 3]

Calls the same Flower functions `secaggplus_mod` (client, stage "collect masked vectors") and
`SecAggPlusWorkflow` (server, stage "unmask") run: weighting, stochastic quantisation, one private mask and
one pairwise mask per neighbour (seeded numpy generators over the whole model), mod 2^32, serialisation; on
the server the sum, private-mask removal and dequantisation. Key agreement and Shamir shares (a few ms) and
the network are left out. Compared with plain FedAvg's weighted average of the same float32 arrays. Each
architecture runs in a fresh interpreter so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import peak_rss_mb, run_worker, table  # noqa: E402


def worker(arch: str, hospitals: int, shares: int) -> dict:
    import numpy as np
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from common.settings import ModelConfig
    from common.models import build_model

    clip, target, mod, max_weight = 8.0, 4194304, 4294967296, 1000.0
    base = [v.numpy().astype(np.float32) for v in build_model(ModelConfig(arch=arch, weights="none"), 14, 3)
            .state_dict().values()]
    params = sum(a.size for a in base)
    rng = np.random.default_rng(0)
    updates = [[a + rng.normal(0, 1e-3, a.shape).astype(np.float32) for a in base] for _ in range(hospitals)]
    weights = [400 + 50 * h for h in range(hospitals)]
    seeds = [os.urandom(32) for _ in range(hospitals)]
    dims = [a.shape for a in base]
    rss0 = peak_rss_mb()

    t0 = time.perf_counter()
    masked, up_bytes = [], 0
    for h in range(hospitals):
        ratio = weights[h] / max_weight
        q_ratio = round(ratio * target)
        q = factor_combine(q_ratio, quantize(parameters_multiply(updates[h], q_ratio / target), clip, target))
        q = parameters_addition(q, pseudo_rand_gen(seeds[h], mod, [a.shape for a in q]))
        for n in range(1, shares):                         # one pairwise mask per neighbour
            pair = pseudo_rand_gen(os.urandom(32), mod, [a.shape for a in q])
            q = parameters_addition(q, pair) if n % 2 else parameters_subtraction(q, pair)
        q = parameters_mod(q, mod)
        blob = [ndarray_to_bytes(a) for a in q]
        up_bytes = sum(len(b) for b in blob)
        masked.append(q)
    client_s = (time.perf_counter() - t0) / hospitals

    t0 = time.perf_counter()
    total = masked[0]
    for q in masked[1:]:
        total = parameters_addition(total, q)
    total = parameters_mod(total, mod)
    for h in range(hospitals):                              # pairwise masks cancel when nobody dropped out
        total = parameters_subtraction(total, pseudo_rand_gen(seeds[h], mod, [a.shape for a in total]))
    total = parameters_mod(total, mod)
    _, total = factor_extract(total)
    _ = dequantize(total, clip, target)
    server_s = time.perf_counter() - t0
    peak = peak_rss_mb()

    t0 = time.perf_counter()
    w = np.array(weights, dtype=np.float64) / sum(weights)
    _ = [sum(w[h] * updates[h][i] for h in range(hospitals)) for i in range(len(dims))]
    fedavg_s = time.perf_counter() - t0
    return {"model.arch": arch, "params": params, "client_s": client_s, "server_s": server_s, "fedavg_s": fedavg_s,
            "upload_mb": up_bytes / 2**20, "fp32_mb": params * 4 / 2**20, "peak_rss_mb": peak,
            "peak_rss_over_model_mb": peak - rss0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="smallcnn,resnet18,resnet50")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--shares", type=int, default=3, help="SecAgg+ num_shares (neighbours + 1)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.hospitals, a.shares)))
        return 0
    rows = []
    for arch in a.archs.split(","):
        r = run_worker(__file__, [arch, f"--hospitals={a.hospitals}", f"--shares={a.shares}"])
        rows.append([arch, f"{r['params'] / 1e6:.2f}M", r["client_s"], r["server_s"], r["fedavg_s"], r["fp32_mb"],
                     r["upload_mb"], r["peak_rss_mb"]])
    print(table(["arch", "params", "client s/round", "server s/round", "FedAvg s/round", "fp32 upload MiB",
                 "SecAgg+ upload MiB", "peak RSS MiB"], rows,
                title=f"SecAgg+ numeric cost, {a.hospitals} hospitals, num_shares={a.shares} (this machine)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
