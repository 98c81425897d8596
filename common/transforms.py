"""Preprocessing (deterministic, shared by training and serving) and augmentation (training only).

Pipeline: grayscale [0,1] image -> resize to image_size (antialiased bilinear) -> Gaussian denoise ->
quantise to uint8 -> [augment] -> replicate channels -> normalise. Quantising after denoising makes the
cached training tensors and the served tensors bit-identical, and lets datasets cache 1 byte per pixel.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from common.settings import AugmentConfig, PreprocessConfig


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
        if self.cfg.denoise_sigma > 0:
            sigma = self.cfg.denoise_sigma
            k = 2 * math.ceil(3 * sigma) + 1
            t = v2.functional.gaussian_blur(t, kernel_size=[k, k], sigma=[sigma, sigma])
        return (t[0].clamp(0, 1) * 255).round().to(torch.uint8)

    def finalize(self, img: torch.Tensor) -> torch.Tensor:
        """(1, S, S) uint8 or float [0,1] -> (C, S, S) normalised float32 for the model."""
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if self.cfg.channels == 3:
            x = x.expand(3, -1, -1)
        return (x - self._mean) / self._std

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return self.finalize(self.prepare(pixels))


class Augmenter:
    """Rotation ±deg, zoom, horizontal flip and contrast on the (1, S, S) uint8 image; seeded via torch's RNG."""

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
        return self.transform(img) if self.transform is not None else img
