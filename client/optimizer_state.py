"""A hospital's optimiser moments kept between rounds (`federation.local_optimizer = "kept"`).

A fresh Adam every round rebuilds its moment estimates from the round's first steps, which with ~13 steps a
round is most of them. Kept, each hospital carries its own moments (and step count, so Adam's bias correction
continues) from round to round in its node state (`context.state`), which lives in the SuperNode and never
travels in a reply. The moments are computed from this hospital's gradients (under DP-SGD, its clipped and
noised ones), so they stay where those did. A moment that no longer fits the model's trainable parameters
(another architecture or trainable set in a new run on the same node) is dropped, never loaded into the
wrong parameter. Measured in pneumoniamnist-fedavg-gap (README): no closer to centralised than a fresh Adam,
better calibrated; so not the default.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

TENSORS, SCALARS = "fedxray.optimizer.tensors", "fedxray.optimizer.scalars"   # keys in context.state (one namespace)
log = logging.getLogger(__name__)


def _plain(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Opacus' DPOptimizer wraps the one whose state and param_groups we keep."""
    return getattr(optimizer, "original_optimizer", optimizer)


def keep(optimizer: torch.optim.Optimizer, state: RecordDict) -> None:
    """Store the optimiser's per-parameter state in the node state: its tensors (Adam's exp_avg, exp_avg_sq)
    as an ArrayRecord, its scalars (Adam's step) as a ConfigRecord, both keyed "<param index>.<name>"."""
    tensors, scalars = ArrayRecord(), ConfigRecord()
    for i, per_param in _plain(optimizer).state_dict()["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{i}.{name}"] = Array(np.ascontiguousarray(value.detach().cpu().numpy()))
            else:
                scalars[f"{i}.{name}"] = float(value)
    state.array_records[TENSORS], state.config_records[SCALARS] = tensors, scalars


def forget(state: RecordDict) -> None:
    for records, key in ((state.array_records, TENSORS), (state.config_records, SCALARS)):
        if key in records:
            del records[key]


def restore(optimizer: torch.optim.Optimizer, state: RecordDict) -> bool:
    """Load the moments this hospital kept last round into a new optimiser over the same trainable
    parameters; False (and a fresh optimiser) when there are none or they do not fit."""
    if TENSORS not in state.array_records or SCALARS not in state.config_records:
        return False
    opt = _plain(optimizer)
    params = [p for g in opt.param_groups for p in g["params"]]
    if not params:
        return False
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, arr in state.array_records[TENSORS].items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = torch.from_numpy(np.array(arr.numpy())).to(params[0].device)
    fits = set(per_param) <= set(range(len(params))) and all(
        t.shape == params[i].shape for i, entry in per_param.items() for t in entry.values())
    if not fits:
        log.warning("kept optimiser state does not fit this model's %d trainable parameters: starting fresh",
                    len(params))
        forget(state)
        return False
    for key, value in state.config_records[SCALARS].items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = torch.tensor(float(value))
    sd = opt.state_dict()
    sd["state"] = per_param
    opt.load_state_dict(sd)
    return True
