"""Settings the tests' federated runs share: the demo profile made tiny (32 px, one local epoch, no
augmentation), so a round takes seconds on 2 cores."""
from __future__ import annotations

from typing import Any

from common.settings import Settings

TINY = {"preprocess.image_size": 32, "train.batch_size": 8, "federation.local_epochs": 1,
        "preprocess.denoise_sigma": 0.0, "augment.enabled": False}


def tiny_settings(*layers: dict[str, Any], **dotted: Any) -> Settings:
    """The demo profile with TINY, then each layer (dotted keys), then keyword overrides."""
    return Settings.build("demo", TINY, *layers, dotted)


def tiny_run_config(*layers: dict[str, Any], **dotted: Any) -> dict[str, Any]:
    """The same as Flower's flat run config (what a Context carries)."""
    return tiny_settings(*layers, **dotted).to_run_config()
