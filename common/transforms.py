"""Preprocessing (deterministic, shared by training and serving) and augmentation (training only).

Pipeline: grayscale [0,1] image -> resize to image_size (antialiased bilinear) -> Gaussian denoise ->
quantise to uint8 -> [augment] -> replicate channels -> normalise. Quantising after denoising makes the
cached training tensors and the served tensors bit-identical, and lets datasets cache 1 byte per pixel.

The denoise is a separable filter in scipy.ndimage (one thread, always), not torch's conv2d: oneDNN's conv2d
on one small image took 16 ms with 2 torch threads vs 0.1 ms with one on these 2 cores, which made data
preparation depend on the thread count (benchmarks/sections/training.py measures it). Same kernel and
reflect padding as torchvision's gaussian_blur; outputs agree to 3e-7 before quantisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from common.settings import AugmentConfig, PreprocessConfig


def gaussian_kernel(sigma: float) -> np.ndarray:
    """torchvision's gaussian_blur kernel: size 2*ceil(3 sigma)+1, float32, normalised to sum 1."""
    size = 2 * math.ceil(3 * sigma) + 1
    x = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).numpy()


def gaussian_denoise(img: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) float32 blurred with a separable Gaussian, reflect padding (torch's "reflect" = scipy's "mirror")."""
    from scipy.ndimage import correlate1d

    k = gaussian_kernel(sigma)
    return correlate1d(correlate1d(img, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")


class Preprocessor:
    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self._mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self._std = torch.tensor(cfg.std).view(-1, 1, 1)

    def prepare(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W) float [0,1] -> (1, S, S) uint8: resized and denoised, ready to cache."""
        t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
        s = self.cfg.image_size
        if t.shape[-2:] != (s, s):
            t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=min(t.shape[-2:]) > s)
        img = t[0, 0].numpy()
        if self.cfg.denoise_sigma > 0:
            img = gaussian_denoise(img, self.cfg.denoise_sigma)
        return torch.from_numpy(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))[None]

    def finalize(self, img: torch.Tensor) -> torch.Tensor:
        """(1, S, S) uint8 or float [0,1] -> (C, S, S) normalised float32 for the model."""
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if self.cfg.channels == 3:
            x = x.expand(3, -1, -1)
        return (x - self._mean) / self._std

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return self.finalize(self.prepare(pixels))


class Augmenter:
    """Rotation ±deg, zoom, horizontal flip and contrast on the (1, S, S) uint8 image; seeded via torch's RNG.

    The uint8 image is augmented as a Pillow image (torchvision's v2 transforms draw their parameters from
    torch's RNG either way): per image, torch's tensor kernels took 20 ms with 2 torch threads vs 0.15 ms for
    Pillow at any thread count, which made augmentation 10x the cost of a smallcnn step (training benchmark)."""

    def __init__(self, cfg: AugmentConfig):
        ops: list = []
        if cfg.rotation_deg > 0 or cfg.zoom > 0:
            ops.append(v2.RandomAffine(degrees=cfg.rotation_deg, scale=(1 - cfg.zoom, 1 + cfg.zoom)))
        if cfg.hflip_p > 0:
            ops.append(v2.RandomHorizontalFlip(cfg.hflip_p))
        if cfg.contrast > 0:
            ops.append(v2.ColorJitter(contrast=cfg.contrast))
        self.transform = v2.Compose(ops) if (cfg.enabled and ops) else None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return img
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 1:
            return self.transform(img)
        from PIL import Image

        out = self.transform(Image.fromarray(img[0].numpy()))
        return torch.from_numpy(np.array(out, dtype=np.uint8))[None]
