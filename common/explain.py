"""Class activation maps for every finding, and overlays drawn on the original image.

Fast path (the default): every architecture here ends in global-average-pool -> Linear, so Grad-CAM on the
layer that feeds the pool equals ReLU(sum_k w_ck A_k) up to a positive scale (the gradient of logit c with
respect to A_k is w_ck / (h*w) at every position). One forward pass with a hook on that layer therefore gives
the prediction *and* the maps of all findings. `tests/test_explain.py` proves the match against
pytorch-grad-cam's GradCAM. The rest of the Grad-CAM family comes from pytorch-grad-cam, selectable by name.

Normalisation, in this order, is what makes the maps identical to pytorch-grad-cam's (see
../shared/notes/opacus-and-cam.md): ReLU -> min-max per map on the low-res map -> bilinear resize with
align_corners=False -> min-max again.

Geometry: preprocessing resizes the whole image to S x S (no crop), so a low-res map covers the whole original
image and resizing it straight to (H, W) puts every value over the pixels it came from.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import cam_target_layer, classifier_head

FAST = "fast"
_EPS = 1e-7  # the epsilon pytorch-grad-cam's scale_cam_image uses, so both paths normalise identically


def _grad_cam_classes() -> dict[str, type]:
    """Methods of pytorch-grad-cam that work with a conv target layer and a classifier-output target."""
    import pytorch_grad_cam as g

    return {"gradcam": g.GradCAM, "gradcam++": g.GradCAMPlusPlus, "hirescam": g.HiResCAM,
            "xgradcam": g.XGradCAM, "layercam": g.LayerCAM, "eigencam": g.EigenCAM,
            "eigengradcam": g.EigenGradCAM, "gradcam-elementwise": g.GradCAMElementWise,
            "scorecam": g.ScoreCAM, "ablationcam": g.AblationCAM, "randomcam": g.RandomCAM}


# Names accepted wherever a method is chosen (API query, CLI). scorecam/ablationcam run many forward passes.
CAM_METHODS: tuple[str, ...] = (FAST, "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam",
                                "eigengradcam", "gradcam-elementwise", "scorecam", "ablationcam", "randomcam")


def check_method(method: str) -> str:
    name = method.strip().lower()
    if name not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(CAM_METHODS)}")
    return name


# ------------------------------------------------------------------------------------------- fast path


def forward_with_cams(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (logits (B, F), raw CAMs (B, F, h, w) = ReLU(sum_k w_ck A_k), not yet normalised).

    Call it in no_grad/inference mode. Not safe to run concurrently on the same model from two threads (the
    hook would see both passes); the inference API's Predictor gives the model a single worker thread.
    """
    layer, head = cam_target_layer(model), classifier_head(model)
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()

    def hook(_m, _inp, out):
        if threading.get_ident() == owner:
            captured.append(out)

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the CAM target layer ran {len(captured)} times in one forward pass (expected once)")
    return logits, cams_from_activations(head.weight, captured[0])


def cams_from_activations(weight: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Head weight (F, K) and the CAM target layer's output A (B, K, h, w) -> raw CAMs ReLU(sum_k w_ck A_k)
    (B, F, h, w). Shared by the eager hook above and the exported forwards that output A (inference_api.forward)."""
    weight = weight.detach().to(acts.dtype)
    if acts.ndim != 4 or acts.shape[1] != weight.shape[1]:
        raise TypeError(f"CAM target layer output {tuple(acts.shape)} does not feed the {tuple(weight.shape)} "
                        f"head through a global average pool; the fast path needs that architecture")
    return torch.einsum("fk,bkhw->bfhw", weight, acts).clamp_min_(0)  # ReLU; the bias only shifts every pixel


def _minmax(m: torch.Tensor) -> torch.Tensor:
    lo = m.amin(dim=(-2, -1), keepdim=True)
    m = m - lo
    return m / (_EPS + m.amax(dim=(-2, -1), keepdim=True))


def normalise_cams(cams: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(..., h, w) non-negative maps -> (..., H, W) in [0, 1]: min-max, bilinear resize to `size`, min-max."""
    m = _minmax(cams.float())
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        lead = m.shape[:-2]
        m = _minmax(_resize_bilinear(m.reshape(-1, *m.shape[-2:]), tuple(size)).reshape(*lead, *size))
    return m


def _resize_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres: cv2's INTER_LINEAR, what pytorch-grad-cam's
    scale_cam_image uses (torch's align_corners=False is the same sampling). cv2 rather than F.interpolate:
    on a busy 2-core host torch's intra-op threads turned this small op into 40 ms instead of 0.4 ms, and it
    runs on the API's decode threads beside the model's pass (benchmarks/NOTES.md)."""
    import cv2

    H, W = size
    src = np.ascontiguousarray(maps.detach().cpu().numpy().transpose(1, 2, 0), dtype=np.float32)  # (h, w, N)
    out = np.empty((H, W, src.shape[2]), np.float32)
    for i in range(0, src.shape[2], 512):   # cv2 takes at most 512 channels at once
        part = cv2.resize(src[:, :, i:i + 512], (W, H), interpolation=cv2.INTER_LINEAR)
        out[:, :, i:i + 512] = part.reshape(H, W, -1)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------ pytorch-grad-cam


def grad_cam_maps(model: nn.Module, x: torch.Tensor, targets: Sequence[int], method: str = "gradcam"
                  ) -> np.ndarray:
    """(B, T, S, S) maps from pytorch-grad-cam for each target finding index (one backward per target).

    Targets are raw logits (ClassifierOutputTarget), the maps come back at the input size, normalised the
    way pytorch-grad-cam does it. Gradients left on the parameters are cleared afterwards.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _grad_cam_classes()[check_method(method)]
    out = np.zeros((x.shape[0], len(targets), x.shape[-2], x.shape[-1]), dtype=np.float32)
    try:
        with torch.enable_grad(), cls(model=model, target_layers=[cam_target_layer(model)]) as cam:
            if hasattr(cam, "batch_size"):  # ScoreCAM/AblationCAM: forward passes per chunk of channels
                cam.batch_size = 64
            for j, c in enumerate(targets):
                out[:, j] = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c))] * x.shape[0])
    finally:
        model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------------------------------------- batch


@dataclass
class Explained:
    logits: torch.Tensor   # (B, F)
    targets: list[int]     # finding indices the maps are for
    maps: torch.Tensor     # (B, T, H, W) float in [0, 1]


def explain_batch(model: nn.Module, x: torch.Tensor, *, method: str = FAST, targets: Sequence[int] | None = None,
                  size: tuple[int, int] | None = None) -> Explained:
    """Logits and maps of `targets` (default: every finding) for a preprocessed batch, at `size` (default S x S).

    The fast path costs one forward pass for all findings; pytorch-grad-cam methods cost one forward+backward
    per finding (and ScoreCAM/AblationCAM many more).
    """
    method = check_method(method)
    size = tuple(size) if size is not None else tuple(x.shape[-2:])
    model.eval()
    if method == FAST:
        with torch.inference_mode():
            logits, cams = forward_with_cams(model, x)
        idx = list(range(logits.shape[1])) if targets is None else [int(t) for t in targets]
        return Explained(logits, idx, normalise_cams(cams[:, idx], size))
    with torch.inference_mode():
        logits = model(x)
    idx = list(range(logits.shape[1])) if targets is None else [int(t) for t in targets]
    maps = torch.from_numpy(grad_cam_maps(model, x, idx, method))
    if tuple(maps.shape[-2:]) != size:  # already min-max normalised at S x S: resize and renormalise
        maps = normalise_cams(maps, size)
    return Explained(logits, idx, maps)


# ---------------------------------------------------------------------------- peaks and overlay images


def fit_within(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled down (never up) so the longer side is at most `max_side`."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def peak_xy(heatmap: torch.Tensor | np.ndarray, width: int, height: int) -> tuple[float, float]:
    """The hottest point of a (h, w) map, in original-image pixels (x, y); exact when (h, w) == (H, W)."""
    h = np.asarray(heatmap)   # numpy's argmax: no intra-op threads for a per-overlay call (first max, as torch)
    gh, gw = h.shape[-2:]
    i = int(np.argmax(h.reshape(-1)))
    r, c = divmod(i, gw)
    if (gh, gw) == (height, width):
        return float(c), float(r)
    return (c + 0.5) * width / gw - 0.5, (r + 0.5) * height / gh - 0.5


def resize_gray(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) float [0, 1] -> (height, width), antialiased when shrinking."""
    if pixels.shape == (height, width):
        return pixels
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    shrink = height < pixels.shape[0] or width < pixels.shape[1]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=shrink)[0, 0].clamp_(0, 1).numpy()


@functools.cache
def _jet_lut(dtype: type = np.uint8) -> np.ndarray:
    """matplotlib's 'jet' as a (256, 3) RGB table: its 256 entries as the bytes matplotlib makes of them."""
    import matplotlib  # only the colormap registry: no pyplot, no backend, no fonts

    lut = matplotlib.colormaps["jet"](np.arange(256), bytes=True)[:, :3].astype(dtype)
    lut.setflags(write=False)
    return lut


def _levels(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> the 256 colour levels of the overlays (uint8, rounded)."""
    return (np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 RGB (..., 3): matplotlib's 'jet' (blue = cold, red = hot) at the overlays' 256 levels."""
    return _jet_lut()[_levels(values)]


@functools.lru_cache(maxsize=8)
def _blend_lut(alpha: float) -> np.ndarray:
    """(65536, 3) uint8: the blended colour for every (gray level, heat level) pair, index gray << 8 | heat."""
    g = np.arange(256, dtype=np.float32)[:, None, None]                          # gray level x 1 x 1
    a = (np.arange(256, dtype=np.float32) * (alpha / 255))[None, :, None]         # 1 x heat level x 1
    lut = (g + a * (_jet_lut(np.float32)[None] - g) + 0.5).astype(np.uint8)      # 256 x 256 x 3
    rgbx = np.zeros((65536, 4), np.uint8)   # padded to 4 bytes: one uint32 gather per pixel
    rgbx[:, :3] = lut.reshape(65536, 3)
    out = rgbx.view(np.uint32).reshape(65536)
    out.setflags(write=False)
    return out


def gray_levels(gray: np.ndarray) -> np.ndarray:
    """(H, W) float [0, 1] -> uint16 gray levels shifted into blend's table index (level << 8)."""
    return _levels(gray).astype(np.uint16) << 8


def blend(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, *, levels: np.ndarray | None = None
          ) -> np.ndarray:
    """Colour-mapped heatmap over a grayscale image; opacity grows with the heat so cold areas stay readable.

    gray (H, W) float [0, 1], heatmap (H, W) in [0, 1] -> uint8 (H, W, 3): g + a (jet(heat) - g), rounded, with
    g the gray's 8-bit level and a = heat level x alpha / 255. Both are quantised to 256 levels (what the PNG
    shows anyway), so the blend is one lookup per pixel in a 65536-colour table. `levels` (gray_levels(gray)):
    pass it when blending several maps over the same image.
    """
    idx = gray_levels(gray) if levels is None else levels.copy()
    idx |= _levels(heatmap)
    rgbx = _blend_lut(float(alpha))[idx]                                       # (H, W) uint32
    return np.ascontiguousarray(rgbx.view(np.uint8).reshape(*idx.shape, 4)[..., :3])


def png_bytes(img: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W) or (H, W, 3) RGB -> PNG, through OpenCV (a dependency of pytorch-grad-cam): the Sub filter and
    Huffman-only deflate. On a 512 x 512 overlay of a chest film that encoded in 5.3 ms vs 8.2 ms with the
    default deflate strategy (10 % larger) and ~15 ms with Pillow's level 1 (benchmarks/NOTES.md)."""
    import cv2

    if img.ndim == 3:
        img = img[..., ::-1]   # cv2 writes BGR order
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), [
        cv2.IMWRITE_PNG_COMPRESSION, compress_level, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {img.shape}")
    return buf.tobytes()


@dataclass
class Overlay:
    png: bytes
    width: int
    height: int
    peak_x: float   # original-image pixels
    peak_y: float


def render_overlay(pixels: np.ndarray, cam: torch.Tensor, *, max_side: int | None = None,
                   alpha: float = 0.5, original_size: tuple[int, int] | None = None) -> Overlay:
    """Overlay PNG of one map on the image (scaled to `max_side` at most) and its peak.

    `cam` is one map at any resolution (raw or normalised): it is normalised and resized to the output size
    here, so every overlay uses the same normalisation as the equivalence test. `original_size` (w, h): the
    image's stored size when `pixels` were reduced while decoding; the peak is reported in those pixels.
    """
    return render_overlays(pixels, cam[None], max_side=max_side, alpha=alpha, original_size=original_size)[0]


def render_overlays(pixels: np.ndarray, cams: torch.Tensor, *, max_side: int | None = None, alpha: float = 0.5,
                    original_size: tuple[int, int] | None = None) -> list[Overlay]:
    """render_overlay for every map of `cams` (T, h, w) over the same image: the image is scaled once and all
    maps are normalised and resized in one call."""
    height, width = pixels.shape
    w, h = fit_within(width, height, max_side)
    heats = _normalised_maps(cams, (h, w))                       # (T, h, w) numpy
    gray = resize_gray(pixels, w, h)
    levels = gray_levels(gray)
    out = []
    for heat in heats:
        x, y = peak_xy(heat, *(original_size or (width, height)))
        out.append(Overlay(png_bytes(blend(gray, heat, alpha, levels=levels)), w, h, x, y))
    return out


def _normalised_maps(cams: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """normalise_cams(cams, size) for the overlays, the second min-max in numpy, in place: the same numbers
    (tests/test_explain.py) without torch's intra-op threads on a 14 x 512 x 512 array (36 ms vs a few)."""
    m = _minmax(cams.float())
    if tuple(m.shape[-2:]) == tuple(size):
        return m.numpy()
    r = _resize_bilinear(m, tuple(size)).numpy()
    r -= r.min(axis=(1, 2), keepdims=True)
    r /= _EPS + r.max(axis=(1, 2), keepdims=True)
    return r
