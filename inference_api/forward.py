"""The model's forward pass for serving, picked by measurement: eager PyTorch, TorchScript, or ONNX Runtime.

Every forward returns the three tensors one prediction needs, from ONE pass: the logits (B, F), the CAM target
layer's feature map A (B, K, h, w) (the one-pass CAM is ReLU(sum_k w_ck A_k), see common.explain) and the
penultimate features (B, D) the classifier head reads (the input gate's out-of-distribution distance). The
exported graphs carry A and the features as extra outputs, so heatmaps never cost a second pass.

Why not just eager: on these CPUs ONNX Runtime ran ResNet50 at 224 px, batch 1, at 0.33-0.39x eager `model(x)`
and traced + frozen + `optimize_for_inference` TorchScript at 0.54-0.80x (benchmarks/sections/inference.py
measures it each run; benchmarks/NOTES.md keeps the history). Eager stays the reference: every exported forward
is checked against it on load (`check`: probabilities and feature map within `TOLERANCE`, see max_differences)
and dropped, with a warning, for the next one when it differs or fails to export. pytorch-grad-cam's methods
need gradients and hooks, so they always run on the eager model (Predictor.call).

Exports run on load, in memory: nothing is downloaded, nothing unpickled, nothing written next to the bundle.
`auto` = the fastest here, measured on load: every available forward that passes the check is timed at batch 1
and the quickest serves (onnx needs the optional `onnxruntime`: `pip install fedxray[onnx]`); eager is the
fallback for all.
"""
from __future__ import annotations

import copy
import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from common.models import cam_target_layer, classifier_head

log = logging.getLogger(__name__)

FORWARDS = ("eager", "torchscript", "onnx")
CHOICES = ("auto", *FORWARDS)
PREFERENCE = ("onnx", "torchscript", "eager")   # fallback order of an explicit choice (fastest first, as measured)
TOLERANCE = 1e-4   # max abs difference to eager: probabilities; feature map relative to its largest value


class ForwardUnavailable(RuntimeError):
    """This forward cannot run here (its optional package is missing, or the export failed)."""


class WithFeatureMap(nn.Module):
    """model(x) -> (logits, CAM target layer output A, penultimate features), read by hooks on the way.

    The hooks are registered for the duration of one call, so the wrapped model stays a plain model for
    pytorch-grad-cam; tracing/exporting this module records both extra tensors as graph outputs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(model.training)  # a new Module starts in training mode: torch.onnx.export restores that mode
        # a tuple, not attributes: modules assigned to attributes would be registered twice (and exported twice)
        self._hooked = (cam_target_layer(model), classifier_head(model))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acts: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        owner = threading.get_ident()
        layer, head = self._hooked
        h1 = layer.register_forward_hook(
            lambda _m, _i, out: acts.append(out) if threading.get_ident() == owner else None)
        h2 = head.register_forward_pre_hook(
            lambda _m, inp: feats.append(inp[0]) if threading.get_ident() == owner else None)
        try:
            logits = self.model(x)
        finally:
            h1.remove()
            h2.remove()
        if len(acts) != 1 or len(feats) != 1:
            raise RuntimeError(f"the CAM target layer ran {len(acts)} and the head {len(feats)} times in one pass "
                               f"(expected once each)")
        return logits, acts[0], feats[0].reshape(x.shape[0], -1)


@dataclass
class Forward:
    """A forward pass: `run(x)` -> (logits, A, features) as float32 CPU tensors, in inference mode."""

    name: str                                   # eager | torchscript | onnx
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    detail: str = ""                            # e.g. the onnxruntime version
    build_s: float = 0.0                        # seconds the export took on load
    check: dict = field(default_factory=dict)   # max abs differences to eager on load

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.run(x)

    def describe(self) -> dict:
        return {"forward": self.name, "detail": self.detail, "build_s": round(self.build_s, 2), "check": self.check}


# ------------------------------------------------------------------------------------------------ makers


def eager(model: nn.Module) -> Forward:
    wrapped = WithFeatureMap(model.eval())

    def run(x):
        with torch.inference_mode():
            return wrapped(x)

    return Forward("eager", run, f"torch {torch.__version__}")


def torchscript(model: nn.Module, example: torch.Tensor) -> Forward:
    """jit.trace (with the feature map as an output) -> jit.freeze -> optimize_for_inference (oneDNN fusions)."""
    wrapped = WithFeatureMap(copy.deepcopy(model).eval())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.freeze/optimize_for_inference's deprecation notes, on every load
        traced = torch.jit.trace(wrapped, example, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def run(x):
        with torch.inference_mode():
            return frozen(x)

    return Forward("torchscript", run, f"torch {torch.__version__}")


def onnxruntime_module():
    """The onnxruntime module, or ForwardUnavailable saying how to get it (one place, so tests can fake it).
    torch's exporter needs the `onnx` package as well; the `onnx` extra installs both."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export imports it
        import onnxruntime
    except ImportError as e:
        raise ForwardUnavailable(f"{e.name or 'onnxruntime'} is not installed; `pip install fedxray[onnx]` "
                                 f"adds onnxruntime and onnx") from None
    return onnxruntime


def onnx(model: nn.Module, example: torch.Tensor, threads: int | None = None, spin: bool = False) -> Forward:
    """torch.onnx.export (TorchScript-based exporter, in memory, dynamic batch) -> an ONNX Runtime CPU session.

    `threads`: intra-op threads (default: torch's). Spinning worker threads are turned off: a serving process
    also decodes uploads and answers HTTP on the same cores, and spinning threads would take their time
    (`spin=True` turns them back on; measured no faster at batch 1 on a busy host, benchmarks/NOTES.md).
    """
    ort = onnxruntime_module()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes, on every load
        # from a copy: the exporter switches the module to eval and back to the mode it found, and whatever it
        # (or a future exporter) leaves behind must never reach the live model that eager and Grad-CAM use
        torch.onnx.export(WithFeatureMap(copy.deepcopy(model).eval()), (example,), buf, dynamo=False, input_names=["x"],
                          output_names=["logits", "feature_map", "features"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}, "feature_map": {0: "batch"},
                                        "features": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(buf.getvalue(), sess_options=opts, providers=["CPUExecutionProvider"])

    def run(x):
        logits, acts, feats = session.run(None, {"x": np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)})
        return torch.from_numpy(logits), torch.from_numpy(acts), torch.from_numpy(feats)

    return Forward("onnx", run, f"onnxruntime {ort.__version__}")


def available(name: str) -> bool:
    """Whether `name` can be built here (onnx needs the optional onnxruntime)."""
    if name == "onnx":
        try:
            onnxruntime_module()
        except ForwardUnavailable:
            return False
    return name in FORWARDS


def resolve(choice: str) -> str:
    """'auto' -> the fastest forward available here; an explicit choice must be available (ForwardUnavailable
    says how to get it), so `--forward onnx` without onnxruntime fails at start instead of running slower."""
    choice = (choice or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"unknown forward {choice!r}; choose one of: {', '.join(CHOICES)}")
    if choice == "onnx":
        onnxruntime_module()
    if choice != "auto":
        return choice
    return next(n for n in PREFERENCE if available(n))


def max_differences(reference: Forward, other: Forward, x: torch.Tensor, multilabel: bool = True) -> dict:
    """Max abs differences between two forwards on `x`: probabilities, features, and the feature map, the last
    also relative to its largest value (`feature_map_rel`: random-init ResNet50 maps reach ~240, where float32
    rounding over 50 layers alone is ~4e-4 absolute; a trained model's maps are O(1), where both agree)."""
    from common.training import probabilities

    a, b = reference(x), other(x)
    fmap = float((a[1] - b[1]).abs().max())
    return {"probabilities": float((probabilities(a[0], multilabel) - probabilities(b[0], multilabel)).abs().max()),
            "feature_map": fmap, "feature_map_rel": fmap / max(1.0, float(a[1].abs().max())),
            "features": float((a[2] - b[2]).abs().max())}


def _checked(model: nn.Module, name: str, reference: Forward, example: torch.Tensor, threads: int | None,
             multilabel: bool, tolerance: float) -> Forward | None:
    """The exported forward `name`, or None (with a warning saying why) when it is unavailable, fails to
    export or differs from eager by more than `tolerance`."""
    try:
        t0 = time.perf_counter()
        fwd = onnx(model, example, threads) if name == "onnx" else torchscript(model, example)
        fwd.build_s = time.perf_counter() - t0
        fwd.check = max_differences(reference, fwd, example, multilabel)
    except ForwardUnavailable as e:
        log.warning("forward %s unavailable: %s", name, e)
        return None
    except Exception as e:  # noqa: BLE001 - an export bug must not stop serving: eager still works
        log.warning("forward %s failed to build (%s: %s)", name, type(e).__name__, e)
        return None
    worst = max(fwd.check["probabilities"], fwd.check["feature_map_rel"])
    if worst > tolerance:
        log.warning("forward %s differs from eager by %.2g (> %.0e) on the load check", name, worst, tolerance)
        return None
    return fwd


def fastest(candidates: list[Forward], x: torch.Tensor, rounds: int = 5) -> Forward:
    """The candidate with the lowest median time on `x`, timed round-robin (load from other processes hits
    all alike) after one warm-up pass each; each one's median ms is recorded in its `check`."""
    times: dict[str, list[float]] = {f.name: [] for f in candidates}
    for f in candidates:
        f(x)
    for _ in range(rounds):
        for f in candidates:
            t0 = time.perf_counter()
            f(x)
            times[f.name].append((time.perf_counter() - t0) * 1000)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    for f in candidates:
        f.check = {**f.check, "measured_ms": {k: round(v, 2) for k, v in medians.items()}}
    return min(candidates, key=lambda f: medians[f.name])


def build(model: nn.Module, choice: str = "auto", *, image_size: int, channels: int = 3,
          threads: int | None = None, multilabel: bool = True, tolerance: float = TOLERANCE,
          rounds: int = 5) -> Forward:
    """The forward for `choice`, each export checked against eager on a random input.

    auto: every available forward that passes the check is timed here, on this machine, at batch 1 (`rounds`
    passes each, interleaved) and the fastest serves. An explicit choice that fails to export or differs is
    replaced by the next in PREFERENCE, with a warning naming why, down to eager, which always works.
    """
    name = resolve(choice)
    reference = eager(model)
    example = torch.randn(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if (choice or "auto").strip().lower() == "auto":
        built = [f for n in PREFERENCE[:-1] if available(n)
                 and (f := _checked(model, n, reference, example, threads, multilabel, tolerance)) is not None]
        return fastest([*built, reference], example[:1], rounds) if built else reference
    for candidate in PREFERENCE[PREFERENCE.index(name):-1]:
        fwd = _checked(model, candidate, reference, example, threads, multilabel, tolerance)
        if fwd is not None:
            return fwd
        log.warning("forward %s: trying the next of %s", candidate, ", ".join(PREFERENCE))
    return reference
