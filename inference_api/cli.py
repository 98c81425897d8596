"""`fedxray serve`, `fedxray predict` and `fedxray explain-eval` (heavy imports stay inside the handlers)."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a model bundle over HTTP (FastAPI + uvicorn)",
                       description="Other settings come from FEDXRAY_* environment variables, e.g. "
                                   "FEDXRAY_API_KEY, FEDXRAY_CORS_ORIGINS, FEDXRAY_MAX_UPLOAD_BYTES.")
    s.add_argument("--bundle", default="runs/demo/bundle", help="bundle directory (weights.safetensors + model.json); default: the one `make demo` exports")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (then "
                   "FEDXRAY_API_KEY is required, or --allow-unauthenticated)")
    s.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback address without FEDXRAY_API_KEY (anyone who can reach it may upload "
                        "images and read the model card); loopback never needs it")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    s.add_argument("--forward", choices=["auto", "eager", "torchscript", "onnx"], default=None,
                   help="the model's forward pass (default: FEDXRAY_FORWARD, else auto = the fastest here, timed "
                        "on load among eager, torchscript and onnx (with the optional onnxruntime: `pip install "
                        "fedxray[onnx]`)); each is checked against eager PyTorch on load, eager on a mismatch")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_cmd_serve)

    p = sub.add_parser("predict", help="predict a file or a folder of images -> predictions.csv + overlay PNGs")
    p.add_argument("path", help="an image (PNG/JPEG/DICOM) or a folder searched recursively")
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--explain", choices=["positive", "all", "none"], default="positive",
                   help="which findings get a full-size overlay PNG")
    p.add_argument("--method", default="fast", help="heatmap method (fast, gradcam, gradcam++, ...)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-side", type=int, default=None, help="scale overlays down to this longest side")
    p.add_argument("--min-resolution", type=int, default=64)
    p.set_defaults(func=_cmd_predict)

    e = sub.add_parser("explain-eval", help="score heatmaps against ground-truth boxes (pointing game, IoU)")
    e.add_argument("--bundle", required=True)
    e.add_argument("--data", required=True, help="a source with boxes (ChestX-ray14 layout, synthetic hospital)")
    e.add_argument("--source", default=None, help="layout (default: detected)")
    e.add_argument("--split", default="all", help="official split to score (all, test, trainval)")
    e.add_argument("--method", default="fast")
    e.add_argument("--iou-threshold", type=float, default=0.5, help="heat level (0-1) that counts as 'hot'")
    e.add_argument("--tolerance", type=float, default=0.0, help="pointing-game tolerance in pixels")
    e.add_argument("--max-images", type=int, default=None)
    e.add_argument("--out", default=None, help="report JSON (default: explain_eval.json in the current folder)")
    e.add_argument("--no-card", action="store_true", help="do not record the report in the bundle's model.json")
    e.set_defaults(func=_cmd_explain_eval)


def _cmd_serve(a) -> int:
    import logging

    import uvicorn

    from common.bundle import read_card
    from inference_api import forward
    from inference_api.app import create_app
    from inference_api.settings import Settings

    read_card(a.bundle)  # fail fast with a clear message; the weights load in the background
    overrides = ({"bundle": a.bundle} | ({"threads": a.threads} if a.threads else {})
                 | ({"forward": a.forward} if a.forward else {}))
    settings = Settings(**overrides)
    try:
        chosen = forward.resolve(settings.forward)
    except forward.ForwardUnavailable as e:
        print(f"cannot serve with forward {settings.forward}: {e}", file=sys.stderr)
        return 2
    if not settings.api_key and not a.allow_unauthenticated and not is_loopback(a.host):
        print(f"refusing to serve {a.host}:{a.port} without an API key: clients beyond this machine could upload "
              f"X-rays unauthenticated. Set FEDXRAY_API_KEY (clients send it in the {settings.api_key_header} "
              f"header), listen on 127.0.0.1, or pass --allow-unauthenticated to accept the risk.", file=sys.stderr)
        return 2
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"serving {a.bundle} on http://{a.host}:{a.port}/ (API docs at /docs)"
          + (" with API-key authentication" if settings.api_key else "")
          + ("; forward: auto, the fastest of " + ", ".join(n for n in forward.PREFERENCE if forward.available(n))
             + " timed on load" if settings.forward == "auto" else f"; forward: {chosen}"), file=sys.stderr)
    announce = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - once the model is loaded
    uvicorn.run(create_app(settings, announce=announce), host=a.host, port=a.port, log_level=a.log_level.lower())
    return 0


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only reaches this machine: every address it resolves to is loopback."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def find_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _cmd_predict(a) -> int:
    import torch

    from common.bundle import load_bundle
    from common.explain import check_method, grad_cam_maps, render_overlay
    from common.imageio import DEFAULT_MAX_PIXELS
    from inference_api.predictor import Predictor
    from inference_api.service import InputError, Service

    method = check_method(a.method)
    root = Path(a.path)
    files = find_images(root)
    if not files:
        raise FileNotFoundError(f"no PNG, JPEG or DICOM files under {root}")
    bundle = load_bundle(a.bundle)
    svc = Service(bundle, max_pixels=DEFAULT_MAX_PIXELS, min_resolution=a.min_resolution, overlay_max_side=a.max_side)
    predictor = Predictor(bundle)  # used synchronously (run_batch): no worker thread needed here
    out = Path(a.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows, failed, overlays = [], 0, 0
    for start in range(0, len(files), a.batch_size):
        ready = []
        for f in files[start:start + a.batch_size]:
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            try:
                ready.append((rel, svc.prepare(f.read_bytes(), f.name, keep_side=None)))
            except InputError as e:
                failed += 1
                rows.append({"file": rel, "status": "error", "error": f"{e.code}: {e.detail}"})
        if not ready:
            continue
        x = torch.stack([p.x for _, p in ready])
        probs, cams, feats = predictor.run_batch(x, want_cams=method == "fast" and a.explain != "none")
        for i, (rel, prep) in enumerate(ready):
            try:  # the input gate's out-of-distribution check, as the API runs it
                _, ood = svc.check_features(feats[i])
            except InputError as e:
                failed += 1
                rows.append({"file": rel, "status": "error", "error": f"{e.code}: {e.detail}"})
                continue
            targets = svc.explain_targets(probs[i], list(range(len(svc.findings))) if a.explain == "all" else None)
            row = {"file": rel, "status": "ok", "error": "", "width": prep.image.width, "height": prep.image.height,
                   "format": prep.image.format, "view": prep.image.view or "",
                   "warnings": " | ".join(w.detail for w in prep.warnings + ood),
                   "positive_findings": "|".join(r.finding for r in svc.findings_table(probs[i]) if r.positive)}
            row.update({f: f"{p:.6f}" for f, p in zip(svc.findings, probs[i])})
            if a.explain != "none" and targets:
                maps = cams[i][targets] if cams is not None else torch.from_numpy(
                    grad_cam_maps(bundle.model, prep.x[None], targets, method)[0])
                for j, c in enumerate(targets):
                    ov = render_overlay(prep.image.pixels, maps[j], max_side=a.max_side,
                                        original_size=(prep.image.width, prep.image.height))
                    name = f"{rel.replace('/', '__')}__{svc.findings[c]}.png"
                    (out / "overlays" / name).write_bytes(ov.png)
                    row[f"peak_{svc.findings[c]}"] = f"{ov.peak_x:.0f},{ov.peak_y:.0f}"
                    overlays += 1
            rows.append(row)
    columns = ["file", "status", "error", "width", "height", "format", "view", "warnings", "positive_findings",
               *svc.findings, *[f"peak_{f}" for f in svc.findings]]
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"{len(files) - failed} predicted, {failed} rejected, {overlays} overlays -> {out / 'predictions.csv'}")
    for r in rows:
        if r["status"] == "error":
            print(f"  rejected {r['file']}: {r['error']}", file=sys.stderr)
    return 0 if failed < len(files) else 2


def _cmd_explain_eval(a) -> int:
    from common.bundle import load_bundle, update_card
    from inference_api.explain_eval import card_section, evaluate_explanations, format_report

    bundle = load_bundle(a.bundle)
    report = evaluate_explanations(bundle, a.data, source=a.source, split=a.split, method=a.method,
                                   iou_threshold=a.iou_threshold, tolerance=a.tolerance, max_images=a.max_images)
    print(format_report(report))
    out = Path(a.out or "explain_eval.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {out}")
    if not a.no_card:
        update_card(a.bundle, "explanation_eval", card_section(report))   # public: no paths, no file names
        print(f"recorded in {Path(a.bundle) / 'model.json'} under extra.explanation_eval")
    return 0
