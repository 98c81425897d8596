"""The model bundle: a directory with `weights.safetensors` + `model.json`, exported by training/the server and
served by the inference API. No pickle anywhere, a sha256 ties the card to the weights, and writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

import common
from common.settings import ModelConfig, PreprocessConfig
from common.errors import BundleError
from common.fileio import jsonable, write_atomic
from common.models import strip_wrapper_prefixes, unwrapped, build_model, count_parameters

SCHEMA_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"
_REQUIRED = ("schema_version", "architecture", "findings", "multilabel", "thresholds", "preprocess", "weights")


@dataclass
class Bundle:
    model: nn.Module  # eval mode, CPU
    card: dict
    findings: list[str]
    thresholds: np.ndarray  # (F,), in findings order
    preprocess: PreprocessConfig
    model_config: ModelConfig
    multilabel: bool
    path: Path

    @property
    def model_id(self) -> str:
        return self.card.get("model_id", "")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "safetensors", "flwr", "opacus"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous tensors that share no memory; wrapper prefixes are dropped."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in strip_wrapper_prefixes(model.state_dict()).items()}


def _build_and_load(model_config: ModelConfig, num_outputs: int, channels: int,
                    tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Build the architecture and load `tensors` strictly; a mismatch names the offending keys."""
    model = build_model(model_config.model_copy(update={"weights": "none"}), num_outputs, channels)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{name} {len(keys)}: {few(keys)}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise BundleError(f"{where}: the weights do not fit architecture {model_config.arch} with {num_outputs} "
                          f"outputs and {channels} input channels; " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def save_bundle(out_dir: str | Path, model: nn.Module, *, model_config: ModelConfig, preprocess: PreprocessConfig,
                findings: list[str], thresholds, metrics: dict | None = None, provenance: dict | None = None,
                multilabel: bool = True, extra: dict | None = None, validation=None, test=None) -> Path:
    """Write weights.safetensors then model.json (the card records the weights' sha256); returns the directory.

    The model is checked against `model_config` first, so an unloadable bundle is never written. With the
    `validation` (and `test`) XrayDatasets, the input-quality gate is calibrated on them (common.quality) and
    stored in the card: every bundle maker (centralised training, the federated server) goes through here.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    findings = [str(f) for f in findings]
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if not findings or len(set(findings)) != len(findings):
        raise BundleError(f"findings must be a non-empty list of unique names, got {findings}")
    if thr.shape != (len(findings),) or not np.all(np.isfinite(thr)):
        raise BundleError(f"thresholds must be {len(findings)} finite numbers (one per finding), got {thr.tolist()}")
    tensors = _state_tensors(model)
    _build_and_load(model_config, len(findings), preprocess.channels, tensors, where="save_bundle")

    out.mkdir(parents=True, exist_ok=True)
    weights_path = out / WEIGHTS_FILE
    write_atomic(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    digest = sha256_file(weights_path)
    architecture = model_config.model_copy(update={"weights": "none"}).model_dump(mode="json")
    identity = json.dumps([digest, architecture, findings, thr.tolist(), preprocess.model_dump(mode="json")],
                          sort_keys=True)
    card = {
        "schema_version": SCHEMA_VERSION,
        "fedxray_version": common.__version__,
        "model_id": "fx-" + hashlib.sha256(identity.encode()).hexdigest()[:12],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": architecture,
        "num_parameters": count_parameters(unwrapped(model)),
        "findings": findings,
        "multilabel": bool(multilabel),
        "thresholds": dict(zip(findings, thr.tolist())),
        "preprocess": preprocess.model_dump(mode="json"),
        "input": {"channels": preprocess.channels, "image_size": preprocess.image_size},
        "metrics": jsonable(metrics or {}),
        "provenance": {**jsonable(provenance or {}), "package_versions": _package_versions()},
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "bytes": weights_path.stat().st_size},
        "extra": jsonable(extra or {}),
    }
    if validation is not None:
        from common.quality import calibrate

        card["quality_gate"] = jsonable(calibrate(model, validation, test))
    text = json.dumps(card, indent=2, allow_nan=False) + "\n"
    write_atomic(out / CARD_FILE, lambda tmp: Path(tmp).write_text(text))
    return out


def _missing_message(path: Path) -> str:
    return (f"no model bundle at {path}: expected {WEIGHTS_FILE} and {CARD_FILE}; "
            f"create one with `fedxray train` or a federated run")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def read_card(path: str | Path) -> dict:
    """Parse and validate model.json (a bundle directory or the file itself) without loading any weights."""
    p = Path(path)
    card_path = p if p.suffix == ".json" else p / CARD_FILE
    if not card_path.is_file():
        raise BundleError(_missing_message(p if p.suffix != ".json" else p.parent))
    try:
        card = json.loads(card_path.read_text(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{card_path}: not valid JSON: {e}") from e
    if not isinstance(card, dict):
        raise BundleError(f"{card_path}: expected a JSON object")
    version = card.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise BundleError(f"{card_path}: bundle schema {version} is not supported by this fedxray (supports "
                          f"{SCHEMA_VERSION}); " + ("upgrade fedxray" if newer else "re-export the model"))
    missing = [k for k in _REQUIRED if k not in card]
    if missing:
        raise BundleError(f"{card_path}: missing fields {missing}")
    if not all(isinstance(card[k], dict) for k in ("architecture", "thresholds", "preprocess", "weights")):
        raise BundleError(f"{card_path}: architecture, thresholds, preprocess and weights must be JSON objects")
    return card


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read a bundle, check the weights' sha256 (verify=True) and rebuild the model in eval mode on CPU."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / WEIGHTS_FILE).is_file() or not (p / CARD_FILE).is_file():
        raise BundleError(_missing_message(p))
    card = read_card(p)
    weights_path = p / card["weights"].get("file", WEIGHTS_FILE)
    if not weights_path.is_file() or weights_path.parent.resolve() != p.resolve():
        raise BundleError(_missing_message(p))
    if verify and sha256_file(weights_path) != card["weights"].get("sha256"):
        raise BundleError(f"{weights_path}: {WEIGHTS_FILE} does not match the sha256 recorded in {CARD_FILE}: "
                          f"the bundle was modified or corrupted")
    try:
        model_config = ModelConfig.model_validate({**card["architecture"], "weights": "none"})
        preprocess = PreprocessConfig.model_validate(card["preprocess"])
    except ValidationError as e:
        raise BundleError(f"{p / CARD_FILE}: invalid architecture or preprocess section: {e}") from e
    findings = card["findings"]
    thr_map = card["thresholds"]
    if (not isinstance(findings, list) or not findings or not isinstance(thr_map, dict)
            or len(thr_map) != len(findings) or set(thr_map) != set(findings)):
        raise BundleError(f"{p / CARD_FILE}: findings ({len(findings)}) and thresholds ({len(thr_map)}) "
                          f"do not match one to one")
    try:
        thresholds = np.array([float(thr_map[f]) for f in findings], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{p / CARD_FILE}: thresholds must be numbers: {e}") from e
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as e:
        raise BundleError(f"{weights_path}: not a readable safetensors file: {e}") from e
    model = _build_and_load(model_config, len(findings), preprocess.channels, tensors, where=str(p))
    return Bundle(model=model, card=card, findings=list(findings), thresholds=thresholds, preprocess=preprocess,
                  model_config=model_config, multilabel=bool(card["multilabel"]), path=p)


def warm_start_provenance(weights: str) -> dict | None:
    """What a model started from, for the provenance of every bundle trained from it (model.weights).

    A fedxray bundle (what `fedxray pretrain` writes) is named by its model id and weights sha256, with what its
    own card says it was trained on: the public-data declaration, the source, image and patient counts and the
    data fingerprint (a hash of the sample keys, never the keys). ImageNet is torchvision's published weights; a
    bare weights file is named by its sha256 only, since nothing records what it saw. None: random initialisation.
    """
    w = weights.strip()
    if w.lower() in ("", "none"):
        return None
    if w.lower() == "imagenet":
        return {"kind": "imagenet", "source": "torchvision's published ImageNet-1k weights"}
    p = Path(w).expanduser()
    if p.is_dir() or p.name == WEIGHTS_FILE and (p.parent / CARD_FILE).is_file():
        card = read_card(p if p.is_dir() else p.parent)
        prov = card.get("provenance") or {}
        # where the warm start's data lay on its trainer's disk is nobody else's business (nor a path to copy)
        data = {k: v for k, v in (prov.get("data") or {}).items() if k != "root"} or None
        return {"kind": "bundle", "model_id": card.get("model_id"), "weights_sha256": card["weights"].get("sha256"),
                "architecture": card["architecture"], "public_data": prov.get("public_data"),
                "training": prov.get("training"), "data": data, "epochs_run": prov.get("epochs_run"),
                "test": {k: v for k, v in ((card.get("metrics") or {}).get("test") or {}).get("macro", {}).items()
                         if k in ("auc", "f1", "ece")}}
    return {"kind": "file", "file": p.name, "sha256": sha256_file(p) if p.is_file() else None,
            "note": "a weights file without a model card: what it was trained on is not on record"}


def update_card(path: str | Path, key: str, value: Any) -> dict:
    """Set `extra[key]` in a bundle's model.json (atomic write) and return the new card.

    Only model.json changes: the recorded sha256 covers weights.safetensors and model_id covers the weights,
    architecture, findings, thresholds and preprocessing, so both stay valid. Used by `fedxray explain-eval`.
    """
    p = Path(path)
    card_path = p if p.suffix == ".json" else p / CARD_FILE
    card = read_card(card_path)
    extra = card.get("extra") if isinstance(card.get("extra"), dict) else {}
    card["extra"] = {**extra, str(key): jsonable(value)}
    text = json.dumps(card, indent=2, allow_nan=False) + "\n"
    write_atomic(card_path, lambda tmp: Path(tmp).write_text(text))
    return card
