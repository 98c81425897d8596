"""Flower client mods the ClientApp always carries; each acts only when the message asks for it.

* The hospital boundary (client/boundary.py), outermost: every exception becomes a fixed-vocabulary reply.

* Central DP with client-side clipping: Flower's `fixedclipping_mod` / `adaptiveclipping_mod`, applied when
  the train config carries Flower's clipping-norm key (the DifferentialPrivacyClientSide* wrappers add it).
* SecAgg+: Flower's `secaggplus_mod`, applied when the message carries SecAgg+'s config record. In Flower 1.42
  SecAgg+ exists only for the legacy FitIns/FitRes records (`flwr.server.workflow.SecAggPlusWorkflow` needs a
  LegacyContext), so `_legacy_fit` translates those records to and from the ones `client.app.train` uses;
  parameter names travel in the fit config because legacy Parameters are an unnamed list.
  What a hospital masks is its update, not its weights: (local - global) / scale per array (`secagg_scales`,
  computed from the round's global model on both sides; server/secagg.py adds scale x the aggregate back).
  SecAgg+ clips every value to +/- secagg.clipping_range before quantising it; absolute weights overflow
  that range (BatchNorm running variances reach 10 after one round of a ResNet-50 from scratch: measured in
  benchmarks/sections/secagg.py), updates scaled to the array's own magnitude stay far inside it and keep
  the quantisation step relative to the array. A hospital that still clips logs it and says how many
  values in its metrics ("secagg-clipped", a count, nothing else).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.arrays import to_fp32
from common.models import is_running_statistic

log = logging.getLogger(__name__)

PARAM_NAMES = "param-names"   # fit-config key: comma-separated state-dict keys, in Parameters order
# True while client.app.train runs inside Flower's secaggplus_mod: set here, on the hospital, never read from
# anything the server sends, so a site policy that requires secure aggregation cannot be talked round.
UNDER_SECURE_AGGREGATION: ContextVar[bool] = ContextVar("under_secure_aggregation", default=False)
SECAGG_CLIPPED = "secagg-clipped"   # train metric: values of this hospital's update SecAgg+ clipped
# A running statistic is a data statistic, not a weight moved by small steps: a running variance starts at 1
# and can grow several-fold in the first round; integer counters need steps of 1 after dequantisation.
STATISTICS_HEADROOM = 4.0
COUNTER_SCALE = 2.0 ** 15


def secagg_scales(arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The public scale of each array's update under SecAgg+: max(max|global|, 1), x STATISTICS_HEADROOM for
    BatchNorm running statistics, COUNTER_SCALE for integer counters. A function of the global model alone,
    so the hospitals and the server compute the same numbers without sending them."""
    out = {}
    for k, a in arrays.items():
        if np.dtype(a.dtype).kind in "iub":
            out[k] = COUNTER_SCALE
            continue
        top = max(float(np.abs(a).max()) if a.size else 0.0, 1.0)
        out[k] = top * (STATISTICS_HEADROOM if is_running_statistic(k) else 1.0)
    return out


def _adaptive(ctx: Context, overrides: dict | None) -> bool:
    mode = {**dict(ctx.run_config or {}), **(overrides or {})}.get("central_dp.mode", "off")
    return str(mode).endswith("adaptive")


def make_mods(overrides: dict | None = None) -> list:
    """The ClientApp's mods; `overrides` as in make_client_app (Python callers with an empty run config)."""

    def central_dp(msg: Message, ctx: Context, call_next) -> Message:
        config = msg.content.config_records.get("config") if msg.has_content() else None
        if config is None or KEY_CLIPPING_NORM not in config:
            return call_next(msg, ctx)
        mod = adaptiveclipping_mod if _adaptive(ctx, overrides) else fixedclipping_mod
        return mod(msg, ctx, call_next)

    def secure_aggregation(msg: Message, ctx: Context, call_next) -> Message:
        if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, ctx)
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctx, lambda m, c: _legacy_fit(m, c, call_next))

    from client.boundary import make_boundary_mod

    return [make_boundary_mod(overrides), secure_aggregation, central_dp]


def scaled_update(global_arrays: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """(local - global) / secagg_scales(global), in the global model's order: what a hospital masks."""
    scales = secagg_scales(global_arrays)
    return [(np.asarray(local[k], np.float64) - g.astype(np.float64)) / scales[k] for k, g in global_arrays.items()]


def _legacy_fit(msg: Message, ctx: Context, call_next) -> Message:
    """FitIns records -> {"arrays", "config"} -> our train -> FitRes records carrying the scaled update
    (our "metrics" record kept first)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = dict(fitins.config)
    names = str(cfg.pop(PARAM_NAMES)).split(",")
    if "findings" in cfg:
        cfg["findings"] = [f for f in str(cfg["findings"]).split(",") if f]
    received = dict(zip(names, (bytes_to_ndarray(t) for t in fitins.parameters.tensors), strict=True))
    arrays = ArrayRecord({n: Array(a) for n, a in received.items()})
    msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(cfg)})
    token = UNDER_SECURE_AGGREGATION.set(True)
    try:
        reply = call_next(msg, ctx)
    finally:
        UNDER_SECURE_AGGREGATION.reset(token)
    if reply.has_error():
        return reply
    out = reply.content
    metrics = out["metrics"]
    update = scaled_update(received, {k: v.numpy() for k, v in to_fp32(out["arrays"]).items()})
    clipped = _clipped(ctx, update, float(metrics["num-examples"]))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(metrics["num-examples"]), {})
    legacy = compat.fitres_to_recorddict(fitres, keep_input=True)
    content = RecordDict({"metrics": MetricRecord({**dict(metrics), SECAGG_CLIPPED: clipped}),
                          **{k: v for k, v in out.items() if k not in ("arrays", "metrics")}, **dict(legacy.items())})
    return Message(content, reply_to=msg)


def _clipped(ctx: Context, update: list[np.ndarray], num_examples: float) -> int:
    """How many values of the weighted update secaggplus_mod will clip (it multiplies by num-examples /
    max_weight, then clips to +/- clipping_range, both from the SETUP stage's state); logged here."""
    state = ctx.state.config_records.get(RECORD_KEY_STATE)
    if state is None or not state.get("clipping_range") or not state.get("max_weight"):
        return 0
    bound = float(state["clipping_range"]) / (num_examples / float(state["max_weight"]))
    n = int(sum(int((np.abs(u) > bound).sum()) for u in update))
    if n:
        log.warning("secure aggregation: %d values of this hospital's update exceed +/- %.3g "
                    "(secagg.clipping_range / (num-examples / secagg.max_weight)) and are clipped: raise "
                    "secagg.clipping_range", n, bound)
    return n
