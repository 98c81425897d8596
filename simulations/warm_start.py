"""The experiment's warm start: `fedxray pretrain`'s own code path (`common.centralised.run_centralised` with a
public-data declaration) on the protocol's public slice, trained once per experiment into
<output_dir>/warm-start/ and reused while its settings and its images stay the same.

The slice is written as one folder with its own patient-level train/val/test (the pretrainer selects its epoch
on public validation images, never on the global validation set every arm is scored against), and the network
is the GroupNorm variant DP-SGD needs, so a DP arm and its non-DP reference start from the very same weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from common.errors import FedxrayError
from common.settings import Settings
from simulations.config import SimulationConfig
from simulations.flower_data import write_split_folder
from simulations.protocol import Protocol, split_hospital
from simulations.store import fingerprint, write_json

log = logging.getLogger(__name__)
PUBLIC_SPLIT = (0.8, 0.1, 0.1)   # the public slice's own train/val/test, by patient


def warm_start_settings(cfg: SimulationConfig, out: Path, findings: list[str]) -> Settings:
    """What the warm start trains with: the experiment's sections, the GroupNorm network, its own epochs/lr."""
    ws = cfg.warm_start
    return cfg.experiment().updated(**{
        "data.path": str(out / "data"), "data.source": "medmnist", "data.official_split": "keep",
        "data.findings": list(findings), "model.dp_compatible": True, "train.epochs": ws.epochs,
        "train.lr": ws.lr or cfg.train.lr, "train.early_stopping_patience": 0, "train.bootstrap": 0,
        "output_dir": str(out)})


def ensure_warm_start(cfg: SimulationConfig, proto: Protocol, *, progress: bool = False) -> Path:
    """The warm start's bundle directory (trained now if no matching one is on disk)."""
    from common.centralised import run_centralised

    if cfg.warm_start is None:
        raise FedxrayError("an arm has warm_start = true but the experiment has no [warm_start] table")
    public = proto.global_splits.get("public")
    if not public:
        raise FedxrayError("the protocol has no public slice: build it with warm_start.public_fraction")
    out = Path(cfg.output_dir) / "warm-start"
    settings = warm_start_settings(cfg, out, list(proto.manifest.findings))
    keys = sorted(proto.manifest.samples[i].key for i in public)
    fp = fingerprint(settings.to_run_config(), keys, cfg.warm_start.model_dump(mode="json"), cfg.seed)
    bundle, marker = out / "bundle", out / "fingerprint.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp and (bundle / "model.json").is_file():
        return bundle
    splits = split_hospital(proto.manifest, public, PUBLIC_SPLIT, cfg.seed, "public slice")
    counts = write_split_folder(proto.manifest, splits, out / "data", cfg.preprocess.image_size)
    log.info("training the warm start on the public slice (%s images) for %d epochs", counts, cfg.warm_start.epochs)
    run_centralised(settings, progress=progress, run_id="warm-start", public=cfg.warm_start.statement)
    write_json(marker, {"fingerprint": fp, "images": counts})
    return bundle
