"""Model weights on the wire: torch state dict <-> Flower ArrayRecord, optionally as float16.

float16 halves the bytes of every float tensor (integer buffers such as BatchNorm's `num_batches_tracked`
stay as they are). Aggregation always happens in float32: the server decodes replies before the strategy
sees them, so float16 only affects what travels, never the arithmetic of FedAvg & co.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common.errors import FedxrayError
from common.models import strip_wrapper_prefixes, unwrapped


def state_to_record(model: nn.Module | dict[str, torch.Tensor], fp16: bool = False) -> ArrayRecord:
    """The model's state dict (wrapper prefixes removed) as an ArrayRecord."""
    sd = model if isinstance(model, dict) else strip_wrapper_prefixes(unwrapped(model).state_dict())
    rec = ArrayRecord({k: v.detach().cpu() for k, v in sd.items()})
    return to_fp16(rec) if fp16 else rec


def _convert(record: ArrayRecord, src: tuple, dst) -> ArrayRecord:
    out = ArrayRecord()
    for k, arr in record.items():
        a = arr.numpy()
        out[k] = Array(a.astype(dst)) if a.dtype in src else arr
    return out


def to_fp16(record: ArrayRecord) -> ArrayRecord:
    """Float tensors as float16 (lossy: ~3 significant digits); others untouched."""
    return _convert(record, (np.dtype(np.float32), np.dtype(np.float64)), np.float16)


def to_fp32(record: ArrayRecord) -> ArrayRecord:
    """float16 tensors back to float32; a float32 record comes back unchanged (same Array objects)."""
    if not any(arr.numpy().dtype == np.float16 for arr in record.values()):
        return record
    return _convert(record, (np.dtype(np.float16),), np.float32)


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Copy the record into the model (dtypes are cast to the model's), strictly: same keys, same shapes."""
    target = unwrapped(model)
    sd = {k: torch.from_numpy(np.array(arr.numpy())) for k, arr in record.items()}
    missing = set(target.state_dict()) - set(sd)
    unexpected = set(sd) - set(target.state_dict())
    if missing or unexpected:
        raise FedxrayError(f"global weights do not fit this model: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}; do all nodes and the server use the same arch/findings?",
                           failure="model")
    target.load_state_dict(sd, strict=True)


def record_bytes(record: ArrayRecord) -> int:
    """Serialised payload bytes of the arrays (what Flower ships, headers included)."""
    return sum(len(arr.data) for arr in record.values())


def payload_bytes(content) -> int:
    """Bytes a RecordDict carries: array data, bytes/str config and metric values, 8 per number (no protobuf
    framing). Counts messages whose weights are not an "arrays" record too (SecAgg+'s stage messages)."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in (*content.config_records.values(), *content.metric_records.values()):
        for v in rec.values():
            for x in (v if isinstance(v, list) else [v]):
                n += len(x) if isinstance(x, (bytes, str)) else 8
    return n
