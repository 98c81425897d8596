"""What the tests' federated runs share: the demo profile made tiny (32 px, one local epoch, no augmentation),
so a round takes seconds on 2 cores, and a CLI started as a terminal would start it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
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


def run_cli(args: list[str], env: dict, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in its own process group (as a terminal would start it), killed with its group on timeout;
    stdout and stderr together."""
    from server.processes import stop_tree

    p = subprocess.Popen([sys.executable, *args], cwd=cwd or Path(__file__).resolve().parents[1], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = "timeout"
    finally:
        stop_tree(p.pid, grace=5)
    return subprocess.CompletedProcess(args, p.returncode if p.returncode is not None else -9, out, "")
