"""What client-side DP-SGD costs on real chest X-rays: PneumoniaMNIST split across 3 hospitals (IID), FedAvg,
no DP vs (epsilon, delta=1e-5) for epsilon in {1, 3, 8}, ResNet18 and ResNet50 (Opacus-safe GroupNorm variant,
from scratch), test AUC / F1 (threshold tuned on the validation split), training images/s and peak memory.

    .venv/bin/python benchmarks/privacy.py [--rounds 3] [--size 32] [--archs resnet18,resnet50]
                                           [--epsilons none,1,3,8] [--max-train 0] [--out DIR]

Each configuration runs in a fresh interpreter (peak RSS is per configuration) and is cached in
<out>/results.json (a rerun skips finished ones). The federation is simulated in-process: every round each
hospital starts from the global weights, trains `--local-epochs` with the same code the ClientApp uses
(common.training.train_epoch; client.privacy.PrivacyBudget: noise calibrated to the target epsilon over all
planned rounds, Poisson sampling, RDP accountant, budget carried between rounds as plain numbers), and the
server averages by number of examples (FedAvg). The global model is evaluated on the official val/test splits.
Data: ../shared/data/pneumoniamnist.npz (28 px, upsampled to --size).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import SHARED_DATA, peak_rss_mb, run_worker, table  # noqa: E402

DATA = SHARED_DATA / "pneumoniamnist.npz"
HOSPITALS = 3
DELTA = 1e-5


def _tensors(images, labels, size: int):
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.from_numpy(labels.astype("float32")).reshape(len(labels), -1)
    return TensorDataset(x, y, torch.ones_like(y, dtype=torch.bool))


def _attach(budget, mode: str, model, opt, loader, criterion):
    """PrivacyBudget.attach in grad-sample mode `mode`; ghost clipping wraps the loss too (per-sample norms
    without grad_sample). Returns (engine, model, optimizer, criterion, loader)."""
    engine, model, opt, loader, criterion = budget.attach(model, opt, loader, criterion)
    return engine, model, opt, criterion, loader


def worker(arch: str, eps: float | None, a) -> dict:
    """One configuration, start to end: R FedAvg rounds over 3 hospitals; returns metrics and costs."""
    import numpy as np
    import torch

    from client.privacy import PrivacyBudget, unwrap
    from common.settings import ModelConfig, PrivacyConfig, TrainConfig
    from common.models import build_model
    from common.training import MaskedBCELoss, evaluate, make_loader, make_optimizer, seed_everything, train_epoch

    torch.set_num_threads(a.threads)
    seed_everything(a.seed)
    d = np.load(DATA)
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(len(d["train_labels"]))
    if a.max_train:
        order = order[: a.max_train]
    parts = np.array_split(order, HOSPITALS)
    train = [_tensors(d["train_images"][p], d["train_labels"][p], a.size) for p in parts]
    val, test = (_tensors(d[f"{s}_images"], d[f"{s}_labels"], a.size) for s in ("val", "test"))
    mcfg = ModelConfig(arch=arch, weights="none", dp_compatible=True)   # same network with and without DP
    tcfg = TrainConfig(batch_size=a.batch, lr=a.lr, weight_decay=0.0)
    global_model = build_model(mcfg, 1, 1)
    weights = {k: v.clone() for k, v in global_model.state_dict().items()}
    pcfg = (PrivacyConfig(enabled=True, target_epsilon=eps, delta=DELTA, max_grad_norm=a.clip, grad_sample_mode=a.mode)
            if eps else None)
    criterion = MaskedBCELoss()
    budgets, eps_spent, images, train_s = [], [0.0] * HOSPITALS, 0, 0.0
    for ds in train:
        steps = PrivacyBudget.steps_per_epoch(len(ds), a.batch) * a.local_epochs * a.rounds
        budgets.append(PrivacyBudget(pcfg, len(ds), a.batch, steps) if pcfg else None)
    for rnd in range(1, a.rounds + 1):
        updates = []
        for h, ds in enumerate(train):
            model = build_model(mcfg, 1, 1)
            model.load_state_dict(weights)
            opt = make_optimizer(model, tcfg)
            loader = make_loader(ds, a.batch, shuffle=True, seed=a.seed + 100 * rnd + h, drop_last=True)
            b, crit = budgets[h], criterion
            if b is not None:
                engine, model, opt, crit, loader = _attach(b, a.mode, model, opt, loader, criterion)
                if a.physical_batch:   # same logical (Poisson) batches, computed in smaller pieces: less memory
                    from opacus.utils.batch_memory_manager import BatchMemoryManager

                    loader = BatchMemoryManager(data_loader=loader, max_physical_batch_size=a.physical_batch,
                                                optimizer=opt).__enter__()
            for _ in range(a.local_epochs):
                r = train_epoch(model, loader, opt, crit)
                images, train_s = images + r["num_examples"], train_s + r["seconds"]
            if b is not None:
                eps_spent[h] = b.record(engine)
            updates.append((len(ds), {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}))
        total = sum(n for n, _ in updates)
        weights = {k: sum(n * sd[k].float() for n, sd in updates) / total for k in weights}
        print(f"round {rnd}: {images / max(train_s, 1e-9):.1f} img/s, eps {[round(e, 2) for e in eps_spent]}",
              file=sys.stderr, flush=True)
    global_model.load_state_dict(weights)
    v = evaluate(global_model, make_loader(val, 256, shuffle=False), ["Pneumonia"], tune="f1")
    thr = np.array([v["per_finding"]["Pneumonia"]["threshold"]])
    t = evaluate(global_model, make_loader(test, 256, shuffle=False), ["Pneumonia"], thresholds=thr)
    return {"model.arch": arch, "epsilon_target": eps, "epsilon_spent": eps_spent,
            "noise_multiplier": budgets[0].noise_multiplier if budgets[0] else None,
            "test_auc": t["macro"]["auc"], "test_f1": t["macro"]["f1"], "val_auc": v["macro"]["auc"],
            "train_images": images, "train_seconds": train_s, "images_per_s": images / max(train_s, 1e-9),
            "peak_rss_mb": peak_rss_mb(), "hospital_sizes": [len(ds) for ds in train]}


def throughput(arch: str, mode: str, a) -> dict:
    """Training speed and peak memory of one local epoch slice (`--steps` batches of real images): no DP vs
    DP-SGD in Opacus mode `mode` ('none' = plain training of the same GroupNorm network)."""
    import numpy as np
    import torch

    from client.privacy import PrivacyBudget
    from common.models import build_model
    from common.settings import ModelConfig, PrivacyConfig, TrainConfig
    from common.training import MaskedBCELoss, make_loader, make_optimizer, seed_everything, train_epoch

    torch.set_num_threads(a.threads)
    seed_everything(a.seed)
    d = np.load(DATA)
    n = a.batch * (a.steps + 1)
    ds = _tensors(d["train_images"][:n], d["train_labels"][:n], a.size)
    model = build_model(ModelConfig(arch=arch, weights="none", dp_compatible=True), 1, 1)
    opt = make_optimizer(model, TrainConfig(batch_size=a.batch, lr=a.lr, weight_decay=0.0))
    loader, crit = make_loader(ds, a.batch, shuffle=True, seed=a.seed, drop_last=True), MaskedBCELoss()
    if mode != "none":
        b = PrivacyBudget(PrivacyConfig(enabled=True, target_epsilon=8.0, delta=DELTA, grad_sample_mode=mode),
                          len(ds), a.batch, a.steps)
        _, model, opt, crit, loader = _attach(b, mode, model, opt, loader, crit)
    r = train_epoch(model, loader, opt, crit)
    return {"model.arch": arch, "mode": mode, "images_per_s": r["images_per_s"], "peak_rss_mb": peak_rss_mb()}


def _label(eps) -> str:
    return "none" if eps is None else f"{eps:g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/privacy")
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--epsilons", default="none,1,3,8", help="'none' = no DP")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--size", type=int, default=32, help="image side (PneumoniaMNIST is 28 px)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-sample clipping norm")
    p.add_argument("--max-train", type=int, default=0, help="cap the training images (0 = all 3,882)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="ghost", choices=["hooks", "ghost", "ew", "functorch"],
                   help="Opacus grad-sample mode (same clipping and noise; only speed/memory differ)")
    p.add_argument("--physical-batch", type=int, default=0, help="Opacus BatchMemoryManager piece size (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput", action="store_true",
                   help="only the back-to-back speed/memory table: no DP vs DP modes, --steps batches each")
    p.add_argument("--modes", default="none,hooks,ghost", help="with --throughput")
    p.add_argument("--steps", type=int, default=12, help="with --throughput: batches per measurement")
    p.add_argument("--worker", nargs=2, metavar=("ARCH", "EPS"), help=argparse.SUPPRESS)
    p.add_argument("--tp-worker", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if not DATA.is_file():
        print(f"error: {DATA} not found: this benchmark needs the workplace's shared data (see "
              "../shared/data/README.md); nothing to do without it", file=sys.stderr)
        return 2
    if a.tp_worker:
        print(json.dumps(throughput(*a.tp_worker, a)))
        return 0
    if a.throughput:
        return _throughput_table(a)
    if a.worker:
        arch, eps = a.worker
        print(json.dumps(worker(arch, None if eps == "none" else float(eps), a)))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    passthrough = [f"--{k}={getattr(a, k.replace('-', '_'))}" for k in
                   ("rounds", "federation.local_epochs", "size", "batch", "lr", "clip", "max-train", "threads", "seed", "mode",
                    "physical-batch")]
    settings = " ".join(passthrough)
    for arch in a.archs.split(","):
        for e in a.epsilons.split(","):
            key = f"{arch}|{e}|{settings}"
            if key not in results:
                t0 = time.perf_counter()
                print(f"running {arch} epsilon={e} ...", file=sys.stderr, flush=True)
                results[key] = {**run_worker(__file__, [arch, e, *passthrough]),
                                "wall_s": time.perf_counter() - t0}
                cache.write_text(json.dumps(results, indent=1))
    rows = []
    for arch in a.archs.split(","):
        base = results.get(f"{arch}|none|{settings}")
        for e in a.epsilons.split(","):
            r = results[f"{arch}|{e}|{settings}"]
            rows.append([arch, e, None if r["epsilon_target"] is None else max(r["epsilon_spent"]),
                         r["noise_multiplier"], r["test_auc"], r["test_f1"],
                         None if base is None or r is base else r["test_auc"] - base["test_auc"],
                         r["images_per_s"], r["peak_rss_mb"], r["wall_s"]])
    print(table(["arch", "target eps", "eps spent (max of 3)", "noise sigma", "test AUC", "test F1", "dAUC vs no DP",
                 "train img/s", "peak RSS MiB", "wall s"], rows,
                title=f"PneumoniaMNIST, {HOSPITALS} hospitals IID, FedAvg; delta={DELTA}; {settings}"))
    return 0


def _throughput_table(a) -> int:
    import subprocess

    rows = []
    for arch in a.archs.split(","):
        base = None
        for mode in a.modes.split(","):
            args = [sys.executable, __file__, "--tp-worker", arch, mode, f"--batch={a.batch}", f"--size={a.size}",
                    f"--steps={a.steps}", f"--threads={a.threads}", f"--lr={a.lr}", f"--seed={a.seed}"]
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode != 0:   # e.g. killed for memory
                rows.append([arch, mode, None, None, f"failed (exit {proc.returncode})"])
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            base = base or (r if mode == "none" else None)
            rows.append([arch, mode, r["images_per_s"], r["peak_rss_mb"],
                         f"{base['images_per_s'] / r['images_per_s']:.1f}x slower" if base and r is not base else ""])
    print(table(["arch", "DP mode", "train img/s", "peak RSS MiB", "vs no DP"], rows,
                title=f"Back to back, batch {a.batch}, {a.size} px, {a.steps} steps, {a.threads} threads"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
