"""The one training and evaluation loop: centralised training, the Flower clients, the server's global
evaluation and the simulations all call these functions, so there is exactly one definition of a step.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.settings import TrainConfig
from common.calibration import calibrate
from common.errors import FedxrayError, ModelDiverged
from common.metrics import compute_metrics, macro_f1, tune_thresholds


def seed_everything(seed: int, num_threads: int | None = None) -> torch.Generator:
    """Seed python, numpy and torch (CPU runs are then reproducible); returns a generator for DataLoaders."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class MaskedBCELoss(nn.Module):
    """Multi-label BCE that ignores unknown labels (mask False) and can weight positives per finding.

    `reduction='none'` returns one loss per sample (mean over its known findings): Opacus' ghost clipping
    needs a (B,) per-sample loss, which plain BCEWithLogitsLoss (B, F) does not give.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight,
                                                              reduction="none")
        m = torch.ones_like(loss) if mask is None else mask.to(loss.dtype)
        per_sample = (loss * m).sum(1) / m.sum(1).clamp_min(1)
        if self.reduction == "none":
            return per_sample
        return (loss * m).sum() / m.sum().clamp_min(1)


class SoftmaxCELoss(nn.Module):
    """Exclusive classes: every sample must have exactly one positive finding."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, target, mask=None):
        if not torch.all(target.sum(1) == 1):
            raise ValueError("loss='softmax' needs exactly one positive class per image; use loss='bce' for "
                             "multi-label data or data with a normal (all-negative) class")
        return nn.functional.cross_entropy(logits, target.argmax(1), reduction=self.reduction)


def make_criterion(cfg: TrainConfig, train_labels: np.ndarray | None = None) -> nn.Module:
    if cfg.loss == "softmax":
        return SoftmaxCELoss()
    pw = None
    if cfg.pos_weight and train_labels is not None and len(train_labels):
        pos = train_labels.sum(0)
        pw = torch.tensor(np.clip((len(train_labels) - pos) / np.maximum(pos, 1), 0.1, 50), dtype=torch.float32)
    return MaskedBCELoss(pw)


def probabilities(logits: torch.Tensor, multilabel: bool = True) -> torch.Tensor:
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def resolve_device(name: str = "auto") -> torch.device:
    """train.device: "auto" = the first CUDA GPU when torch sees one, else the CPU; "cuda"/"cuda:N" demands one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = ("is a CPU-only build: install a CUDA build of torch" if torch.version.cuda is None else
               f"(CUDA {torch.version.cuda}) sees no GPU: check the driver with `nvidia-smi` and CUDA_VISIBLE_DEVICES")
        raise FedxrayError(f"train.device={name}, but this torch {torch.__version__} {why}; or set "
                           "train.device=auto (the CPU when there is no GPU)")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: batches are moved there (a no-op on the CPU)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                      drop_last=drop_last and len(ds) > batch_size)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
                progress: bool = False, desc: str = "train", proximal_mu: float = 0.0,
                global_params: list[torch.Tensor] | None = None) -> dict:
    """One pass over `loader`. `proximal_mu` > 0 adds FedProx's (mu/2)||w - w_global||^2 term."""
    model.train()
    dev = model_device(model)
    total, n, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if progress else True)
    for x, y, mask in bar:
        if len(x) == 0:  # Poisson sampling (Opacus) can draw an empty batch
            continue
        x, y, mask = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y, mask)
        if proximal_mu > 0 and global_params is not None:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
            loss = loss + 0.5 * proximal_mu * prox
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError("training loss became NaN/inf: lower the learning rate")
        total += loss.item() * len(x)
        n += len(x)
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
    secs = time.perf_counter() - t0
    return {"train_loss": total / max(n, 1), "num_examples": n, "seconds": secs, "images_per_s": n / max(secs, 1e-9)}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, criterion: nn.Module | None = None, *, multilabel: bool = True,
            progress: bool = False, desc: str = "eval") -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(probabilities, labels, mask, mean loss) over a loader, in eval mode."""
    model.eval()
    dev = model_device(model)
    probs, ys, masks, total, n = [], [], [], 0.0, 0
    for x, y, mask in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if progress else True):
        logits = model(x.to(dev, non_blocking=True))
        if criterion is not None:
            total += criterion(logits, y.to(dev), mask.to(dev)).item() * len(x)
        n += len(x)
        probs.append(probabilities(logits, multilabel).cpu().numpy())
        ys.append(y.numpy())
        masks.append(mask.numpy())
    if not probs:
        raise ValueError("cannot evaluate on an empty dataset")
    p = np.concatenate(probs)
    if not np.isfinite(p).all():
        raise diverged(model, f"{desc}: the model gives NaN/inf on {int((~np.isfinite(p)).any(1).sum())} of {len(p)} "
                              "images")
    return p, np.concatenate(ys), np.concatenate(masks), total / max(n, 1)


def diverged(model: nn.Module, what: str) -> ModelDiverged:
    """The error for a model whose outputs are not finite, naming the tensors at fault."""
    state = model.state_dict()
    broken = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    negative = [k for k, t in state.items() if k.endswith("running_var") and (t < 0).any()]
    where = (f"; NaN/inf in {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}" if broken else "")
    where += f"; negative BatchNorm running_var in {', '.join(negative[:3])}" if negative else ""
    return ModelDiverged(f"{what}{where}: training or aggregation diverged. Lower train.lr (federated: federation.fedopt_eta or "
                         "federation.fedavgm_server_lr too), or use federation.strategy=fedavg")


def evaluate(model: nn.Module, loader: DataLoader, findings: list[str], *, criterion: nn.Module | None = None,
             thresholds: np.ndarray | None = None, tune: str | None = None, multilabel: bool = True,
             bootstrap: int = 0, seed: int = 0, progress: bool = False) -> dict:
    """Metrics of `model` on `loader`; with `tune`, thresholds are first tuned on this very data (validation)."""
    p, y, m, loss = predict(model, loader, criterion, multilabel=multilabel, progress=progress)
    if tune:
        thresholds = tune_thresholds(y, p, tune, mask=m)
    result = compute_metrics(y, p, findings, thresholds, mask=m, bootstrap=bootstrap, seed=seed)
    result["loss"] = loss
    return result


SELECTION_RULES = {"val-f1": "best validation macro-F1", "val-auc": "best validation macro AUC",
                   "val-loss": "lowest validation loss"}
SELECTION_FIGURE = {"val-f1": "val_f1", "val-auc": "val_auc", "val-loss": "val_loss"}   # the record field each ranks by


def selection_key(select_on: str, f1: float | None, auc: float | None, loss: float | None) -> tuple[float, float]:
    """The one rule that picks the kept epoch (`fit`) and the kept federated round (the ServerApp): larger is
    better; the other figure breaks ties (F1 and AUC each other, loss by AUC). A missing figure ranks last."""
    f1_, auc_ = (-1.0 if f1 is None else f1), (-1.0 if auc is None else auc)
    if select_on == "val-f1":
        return f1_, auc_
    if select_on == "val-auc":
        return auc_, f1_
    if select_on == "val-loss":
        return (-math.inf if loss is None or math.isnan(loss) else -loss), auc_
    raise ValueError(f"unknown selection rule {select_on!r}; one of {', '.join(SELECTION_RULES)}")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict | None = None
    thresholds: np.ndarray | None = None
    val_metrics: dict | None = None
    stopped_early: bool = False
    calibration: dict | None = None       # common.calibration.calibrate's record unless train.calibration = none


def cosine_lr(base_lr: float, epoch: int, total_epochs: int) -> float:
    """The learning rate of 0-based `epoch` of `total_epochs` under CosineAnnealingLR(T_max=total_epochs), the
    curve `fit` follows: a federation's hospitals use it over rounds x local epochs so that federated and
    centralised training decay alike at matched cost."""
    e = min(max(epoch, 0), max(total_epochs - 1, 0))
    return base_lr * (1 + math.cos(math.pi * e / max(total_epochs, 1))) / 2


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, cfg: TrainConfig, findings: list[str], *,
        criterion: nn.Module, multilabel: bool = True, freeze_backbone_epochs: int = 0, progress: bool = True,
        on_epoch=None) -> FitResult:
    """Adam + scheduler + early stopping; keeps the epoch that `cfg.select_on` ranks best (`selection_key`;
    by default validation macro-F1 at tuned thresholds, the seed paper's rule), AUC reported beside it; then
    calibrates it on validation (`cfg.calibration`), so thresholds and validation metrics are the exported model's."""
    from common.models import set_backbone_trainable

    if freeze_backbone_epochs:
        set_backbone_trainable(model, False)
    optimizer = make_optimizer(model, cfg)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs) if cfg.scheduler == "cosine"
             else torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
             if cfg.scheduler == "plateau" else None)
    res, best_key, since_best = FitResult(), (-math.inf, -math.inf), 0
    epochs = tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch", disable=None if progress else True)
    for epoch in epochs:
        if freeze_backbone_epochs and epoch == freeze_backbone_epochs + 1:
            set_backbone_trainable(model, True)
            optimizer.add_param_group({"params": [p for p in model.parameters()
                                                  if p.requires_grad and not any(p is q for g in optimizer.param_groups for q in g["params"])]})
        tr = train_epoch(model, train_loader, optimizer, criterion, progress=progress, desc=f"epoch {epoch}")
        p, y, m, val_loss = predict(model, val_loader, criterion, multilabel=multilabel)
        thr = tune_thresholds(y, p, cfg.threshold_method, mask=m)
        metrics = compute_metrics(y, p, findings, thr, mask=m)
        auc = metrics["macro"]["auc"]
        row = {"epoch": epoch, "train_loss": tr["train_loss"], "val_loss": val_loss, "val_f1": metrics["macro"]["f1"],
               "val_auc": auc, "lr": optimizer.param_groups[0]["lr"], "seconds": tr["seconds"],
               "images_per_s": tr["images_per_s"]}
        res.history.append(row)
        epochs.set_postfix(val_f1=f"{row['val_f1']:.3f}", val_auc=f"{auc:.3f}" if auc is not None else "n/a")
        key = selection_key(cfg.select_on, row["val_f1"], auc, val_loss)
        if key > best_key:
            best_key, since_best = key, 0
            res.best_epoch, res.thresholds, res.val_metrics = epoch, thr, metrics
            res.best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(row)
        if progress and epochs.disable:   # no bar (output is a log file): one line per epoch instead
            print(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val F1 {row['val_f1']:.3f}  "
                  f"val AUC {'n/a' if auc is None else f'{auc:.3f}'}  ({row['seconds']:.0f} s)", flush=True)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_loss)
        elif sched is not None:
            sched.step()
        if cfg.early_stopping_patience and since_best >= cfg.early_stopping_patience:
            res.stopped_early = True
            break
    if res.best_state is not None:
        model.load_state_dict(res.best_state)
        if cfg.calibration != "none":   # the kept model as it will be exported: calibrated, re-thresholded
            res.calibration = calibrate(model, val_loader, findings, multilabel, cfg.calibration)
            p, y, m, _ = predict(model, val_loader, criterion, multilabel=multilabel)
            res.thresholds = tune_thresholds(y, p, cfg.threshold_method, mask=m)
            res.val_metrics = compute_metrics(y, p, findings, res.thresholds, mask=m)
    return res


__all__ = ["MaskedBCELoss", "SoftmaxCELoss", "make_criterion", "train_epoch", "predict", "evaluate", "fit",
           "FitResult", "selection_key", "SELECTION_RULES", "SELECTION_FIGURE", "seed_everything", "make_loader",
           "make_optimizer", "cosine_lr", "probabilities", "macro_f1"]
