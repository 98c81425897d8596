"""Training throughput with the product's data pipeline vs pre-made tensors, data preparation vs thread count,
and the peak memory of a hospital's training round with and without DP.

- Loader overhead (at the ClientApp's thread count, federation.client_threads): image files on disk (`common.data.synthetic`), read by the product (`prepare_data`: decode,
  resize, denoise, cached uint8; then per item augmentation and normalisation in `XrayDataset`, batches from
  `make_loader`), trained by `common.training.train_epoch`; the reference is the same epoch over the same
  images as float tensors already in memory (no decode, no augmentation), in the same process, interleaved,
  best of `repeats`. 64 px smallcnn (the demo) and 224 px ResNet50 (a few steps).
- Data preparation: `prepare_data` over the same folder with 2 torch threads vs 1 (the ratio should be ~1).
- Peak RSS: `client.app.train` (the ClientApp's own round) on ResNet50 at 224 px, batch 16, each arm in a fresh
  interpreter (the kernel's high-water mark), without DP and with DP-SGD as privacy.trainable=auto sets it
  for a warm-started model.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.suite import REPO, Row

FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]


def _settings(root: Path, size: int, arch: str, batch: int, max_samples: int | None, **extra):
    from common.settings import Settings

    return Settings.build("demo", {"data.path": str(root), "preprocess.image_size": size, "model.arch": arch,
                                   "model.weights": "none", "train.batch_size": batch,
                                   "data.max_samples": max_samples, **extra})


def _synth(root: Path, *, patients: int, size: int) -> Path:
    from common.data.synthetic import synthesize

    synthesize(root, hospitals=1, patients=patients, size=size, seed=3, holdout_patients=0, progress=False)
    return root / "hospital_1"


def loader_overhead(folder: Path, *, size: int, arch: str, batch: int, max_samples: int | None, repeats: int,
                    label: str) -> Row:
    """Seconds per image of train_epoch over the product's loader vs over pre-made tensors of the same images."""
    import torch
    from torch.utils.data import TensorDataset

    from common.data.prepare import prepare_data
    from common.models import build_model
    from common.training import make_criterion, make_loader, make_optimizer, seed_everything, train_epoch

    s = _settings(folder, size, arch, batch, max_samples)
    threads = s.federation.client_threads or torch.get_num_threads()   # what a hospital's ClientApp trains with
    seed_everything(0, threads)
    ds = prepare_data(s, progress=False).datasets["train"]
    premade = TensorDataset(torch.stack([ds.pre.finalize(ds.prepared(i)) for i in range(len(ds))]),
                            torch.from_numpy(ds.labels).float(), torch.from_numpy(ds.mask))
    model = build_model(s.model, len(FINDINGS), s.preprocess.channels)
    opt, crit = make_optimizer(model, s.train), make_criterion(s.train, ds.labels)
    loaders = {name: make_loader(d, batch, shuffle=True, seed=0, num_workers=s.train.num_workers, drop_last=True)
               for name, d in (("pipeline", ds), ("tensors", premade))}
    train_epoch(model, loaders["tensors"], opt, crit)   # warm-up: first-call allocations
    best = {"pipeline": float("inf"), "tensors": float("inf")}
    for _ in range(repeats):
        for name, loader in loaders.items():
            r = train_epoch(model, loader, opt, crit)
            best[name] = min(best[name], r["seconds"] / max(r["num_examples"], 1))
    return Row(what=f"train {label}: product loader from image files (augmentation on)",
               ours=1000 * best["pipeline"], unit="ms/img", reference=1000 * best["tensors"],
               reference_what="the same epoch over pre-made tensors", goal_max=1.10,
               detail={"arch": arch, "size": size, "batch": batch, "images": len(ds), "repeats": repeats,
                       "torch_threads": threads,
                       "images_per_s": {k: 1 / v for k, v in best.items()}})


def preparation_threads(folder: Path, *, size: int, repeats: int) -> Row:
    """prepare_data (decode + resize + denoise + quantise every image) with 2 torch threads vs 1."""
    import torch

    from common.data.prepare import prepare_data

    s = _settings(folder, size, "smallcnn", 16, None, **{"preprocess.denoise_sigma": 1.0})
    best, images = {1: float("inf"), 2: float("inf")}, 0
    default = torch.get_num_threads()
    try:
        for _ in range(repeats):
            for n in (2, 1):
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                data = prepare_data(s, progress=False)
                best[n] = min(best[n], time.perf_counter() - t0)
                images = sum(len(d) for d in data.datasets.values())
    finally:
        torch.set_num_threads(default)
    return Row(what=f"data preparation ({images} image files, {size} px, denoise on), 2 torch threads",
               ours=best[2], unit="s", reference=best[1], reference_what="1 torch thread", goal_max=1.2,
               detail={"images": images, "repeats": repeats})


# ------------------------------------------------------------------------------------------- peak RSS
def rss_worker(folder: str, dp: bool, size: int, batch: int, max_samples: int) -> dict:
    """One ClientApp training round (client.app.train) in this fresh process; its peak RSS."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from benchmarks._util import peak_rss_mb
    from client.app import train
    from common.arrays import state_to_record
    from common.models import build_model

    work = Path(tempfile.mkdtemp(prefix="fedxray-rss-"))
    extra = {"federation.rounds": 1, "federation.local_epochs": 1, "output_dir": str(work / "run"),
             "preprocess.channels": 3}
    if dp:   # a warm start (a weights file), so privacy.trainable=auto picks its pretrained-model recipe
        warm = work / "warm-start.safetensors"
        extra |= {"privacy.enabled": True, "privacy.target_epsilon": 8.0, "model.weights": str(warm)}
    s = _settings(Path(folder), size, "resnet50", batch, max_samples, **extra)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1   # as a Flower runtime sets it
    model = build_model(s.network.model_copy(update={"weights": "none"}), len(FINDINGS), 3)
    if dp:   # what the server would start from; the ClientApp itself receives it as the round's weights
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(warm))
    msg = Message(RecordDict({"arrays": state_to_record(model), "config": ConfigRecord(
        {"server-round": 1, "findings": FINDINGS})}), dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=1, node_config={"data-path": folder}, state=RecordDict(),
                  run_config=s.to_run_config())
    del model
    t0 = time.perf_counter()
    reply = train(msg, ctx)
    if reply.has_error():
        raise RuntimeError(f"the training round failed: {reply.error.reason}")
    m = reply.content["metrics"]
    from client.privacy import dp_trainable, is_pretrained

    return {"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0, "examples": int(m["num-examples"]),
            "epsilon": float(m["dp-epsilon"]) if "dp-epsilon" in m else None,
            "trainable": dp_trainable(s.privacy, is_pretrained(s.model.weights)) if dp else "all"}


def _rss_both(folder: Path, size: int, batch: int, max_samples: int) -> dict[bool, dict]:
    """Both arms at once, each in its own fresh interpreter (a process's high-water mark is its own)."""
    procs = {dp: subprocess.Popen([sys.executable, "-m", "benchmarks.sections.training", "--rss-worker", str(folder),
                                   "dp" if dp else "nodp", str(size), str(batch), str(max_samples)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for dp in (False, True)}
    out = {}
    for dp, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"peak-RSS worker (dp={dp}) failed:\n{stderr[-3000:]}")
        out[dp] = json.loads(stdout.strip().splitlines()[-1])
    return out


def rows(quick: bool) -> list[Row]:
    out: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedxray-bench-train-") as tmp:
        small = _synth(Path(tmp) / "small", patients=16 if quick else 120, size=128)
        out.append(loader_overhead(small, size=64, arch="smallcnn", batch=16, max_samples=None,
                                   repeats=1 if quick else 3, label="64 px smallcnn"))
        large = _synth(Path(tmp) / "large", patients=12 if quick else 24, size=256)
        out.append(loader_overhead(large, size=32 if quick else 224, arch="resnet18" if quick else "resnet50",
                                   batch=4 if quick else 16, max_samples=8 if quick else 32, repeats=1 if quick else 2,
                                   label="32 px resnet18 (quick)" if quick else "224 px ResNet50"))
        out.append(preparation_threads(small, size=64, repeats=1 if quick else 2))
        size, batch, cap = (32, 4, 8) if quick else (224, 16, 32)
        rss = _rss_both(large, size, batch, cap)
        what = f"peak RSS, ClientApp round, ResNet50 {size} px batch {batch}"
        out.append(Row(what=f"{what}, no DP", ours=rss[False]["peak_rss_mb"], unit="MiB",
                       detail={**rss[False], "size": size, "batch": batch}))
        out.append(Row(what=f"{what}, DP-SGD ({rss[True]['trainable']}, warm start)", ours=rss[True]["peak_rss_mb"],
                       unit="MiB", reference=rss[False]["peak_rss_mb"], reference_what="the same round without DP",
                       detail={**rss[True], "size": size, "batch": batch}))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-worker":
        folder, arm, size, batch, cap = sys.argv[2:7]
        print(json.dumps(rss_worker(folder, arm == "dp", int(size), int(batch), int(cap))))
