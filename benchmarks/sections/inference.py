"""Inference on this CPU: each forward variant vs eager `model(x)`, predict vs the fastest correct forward, and all
findings' overlays as PNG vs predict. ResNet50 at 224 px, batch 1, 14 findings, random-init weights saved and
loaded through the product's bundle code (timing does not depend on the weights; nothing is downloaded).

All paths run round-robin in one process (benchmarks/inference.py `interleaved`), so load from other processes
hits every row alike; the ratios are what counts. The references are the bare model's forwards (`model(x)`, no
feature map): eager, channels_last, traced + frozen + optimize_for_inference TorchScript, ONNX Runtime. "Correct"
= max abs difference of the probabilities to eager <= 1e-4. Ours: the product's Predictor with the forward
`fedxray serve` picks (auto), CAM features included (want_cams: feature map, heatmaps of all findings), and
Service.explanations for all findings (the PNGs + base64 a findings=all answer carries).
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.suite import Row

PROBABILITY_TOLERANCE = 1e-4


def _bare_forwards(model, example):
    """name -> (callable x -> logits, what it is): the reference forwards of the bare model."""
    import torch

    out = {}

    def eager(x):
        with torch.inference_mode():
            return model(x)

    out["eager"] = (eager, "eager model(x)")
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def channels_last(x):
        with torch.inference_mode():
            return cl_model(x.contiguous(memory_format=torch.channels_last))

    out["channels_last"] = (channels_last, "channels_last (model and input)")
    with torch.no_grad():
        ts = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), example)))

    def torchscript(x):
        with torch.inference_mode():
            return ts(x)

    out["torchscript"] = (torchscript, "jit.trace + freeze + optimize_for_inference")
    try:
        import onnxruntime as ort
    except ImportError:
        return out
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (example,), buf, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buf.getvalue(), sess_options=opts, providers=["CPUExecutionProvider"])
    out["onnx"] = (lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0]),
                   f"ONNX Runtime {ort.__version__} (its default session options)")
    return out


def rows(quick: bool) -> list[Row]:
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from benchmarks.inference import interleaved, make_bundle, upload_png
    from common.bundle import load_bundle
    from common.training import probabilities
    from inference_api.limits import single_threaded_torch
    from inference_api.predictor import Predictor
    from inference_api.service import Service

    arch, size, n, iters, side = ("smallcnn", 64, 14, 5, 128) if quick else ("resnet50", 224, 14, 20, 512)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(make_bundle(Path(tmp), arch, size, n))
    model = bundle.model
    svc = Service(bundle, max_pixels=60_000_000, min_resolution=1, overlay_max_side=512)
    upload = upload_png(side)
    prepared = svc.prepare(upload, keep_side=512)   # what the API keeps when overlays are asked for
    x = prepared.x[None]
    refs = _bare_forwards(model, x)
    with torch.inference_mode():
        p_eager = probabilities(model(x)).numpy()
    diffs = {k: float(np.abs(probabilities(fn(x)).numpy() - p_eager).max()) for k, (fn, _) in refs.items()}

    targets = list(range(n))
    # the overlays run where the API runs them: on a decode thread (inference_api.limits.Decoder)
    decode = ThreadPoolExecutor(1, initializer=single_threaded_torch)
    with Predictor(bundle, forward="auto") as pred, decode:
        def predict():
            return pred.submit(prepared.x, want_cams=True).result()

        def overlays(side=None):
            out = pred.submit(prepared.x, want_cams=True).result()
            decode.submit(svc.explanations, prepared.image, out.cams[targets], targets, "fast",
                          max_side=side).result()

        paths = {k: (lambda fn=fn: fn(x)) for k, (fn, _) in refs.items()}
        paths |= {"predict": predict, "overlays": overlays, "overlays_256": lambda: overlays(256)}
        t = interleaved(paths, iters)
        forward = pred.forward
        p_ours = predict().probabilities
    p50 = {k: v[0] for k, v in t.items()}
    correct = {k: v for k, v in p50.items() if k in refs and diffs[k] <= PROBABILITY_TOLERANCE}
    fastest = min(correct, key=correct.get)
    setting = f"{arch} {size} px, batch 1, {n} findings, {torch.get_num_threads()} threads"
    out = [Row(f"forward {refs[k][1]}", p50[k], "ms", p50["eager"], "eager model(x)",
               detail={"p95_ms": t[k][1], "max_abs_diff_probabilities": diffs[k], "setting": setting})
           for k in refs]
    out.append(Row(f"predict p50 (CAM features included; forward {forward.name})", p50["predict"], "ms",
                   p50[fastest], f"fastest correct forward: {fastest}", goal_max=1.15,
                   detail={"p95_ms": t["predict"][1], "forward": forward.describe(),
                           "max_abs_diff_probabilities_to_eager": float(np.abs(p_ours - p_eager[0]).max()),
                           "setting": setting}))
    w, h = prepared.image.pixels.shape[1], prepared.image.pixels.shape[0]
    out.append(Row(f"predict + all {n} overlays as PNG ({w}x{h}, base64)", p50["overlays"], "ms", p50["predict"],
                   "predict", goal_max=2.0, detail={"p95_ms": t["overlays"][1], "upload_side": side,
                                                    "setting": setting}))
    out.append(Row("the same, overlays at 256 px (FEDXRAY_OVERLAY_MAX_SIDE=256)", p50["overlays_256"], "ms",
                   p50["predict"], "predict", detail={"p95_ms": t["overlays_256"][1], "setting": setting},
                   note="informational: the default embeds 512 px overlays; PNG deflate of 14 of them is the floor"))
    return out
