"""Flower client mods the ClientApp always carries; each acts only when the message asks for it.

* The hospital boundary (client/boundary.py), outermost: every exception becomes a fixed-vocabulary reply.

* Central DP with client-side clipping: Flower's `fixedclipping_mod` / `adaptiveclipping_mod`, applied when
  the train config carries Flower's clipping-norm key (the DifferentialPrivacyClientSide* wrappers add it).
* SecAgg+: Flower's `secaggplus_mod`, applied when the message carries SecAgg+'s config record. In Flower 1.42
  SecAgg+ exists only for the legacy FitIns/FitRes records (`flwr.server.workflow.SecAggPlusWorkflow` needs a
  LegacyContext), so `_legacy_fit` translates those records to and from the ones `client.app.train` uses;
  parameter names travel in the fit config because legacy Parameters are an unnamed list.
"""
from __future__ import annotations

from contextvars import ContextVar

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

PARAM_NAMES = "param-names"   # fit-config key: comma-separated state-dict keys, in Parameters order
# True while client.app.train runs inside Flower's secaggplus_mod: set here, on the hospital, never read from
# anything the server sends, so a site policy that requires secure aggregation cannot be talked round.
UNDER_SECURE_AGGREGATION: ContextVar[bool] = ContextVar("under_secure_aggregation", default=False)


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


def _legacy_fit(msg: Message, ctx: Context, call_next) -> Message:
    """FitIns records -> {"arrays", "config"} -> our train -> FitRes records (our "metrics" record kept first)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = dict(fitins.config)
    names = str(cfg.pop(PARAM_NAMES)).split(",")
    if "findings" in cfg:
        cfg["findings"] = [f for f in str(cfg["findings"]).split(",") if f]
    arrays = ArrayRecord({n: Array(bytes_to_ndarray(t)) for n, t in zip(names, fitins.parameters.tensors,
                                                                       strict=True)})
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
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(out["arrays"].to_numpy_ndarrays()),
                    int(metrics["num-examples"]), {})
    legacy = compat.fitres_to_recorddict(fitres, keep_input=True)
    content = RecordDict({"metrics": MetricRecord(dict(metrics)),
                          **{k: v for k, v in out.items() if k not in ("arrays", "metrics")}, **dict(legacy.items())})
    return Message(content, reply_to=msg)
