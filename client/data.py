"""Which images a node trains on, prepared once per process.

Deployment: the node config names the hospital's own folder (`data-path`, optional `source`, `site`).
Simulation: the node config only has `partition-id`/`num-partitions`; the run config's `data.path` is either
a folder of `hospital_*` sites (partition k -> hospital_{k+1}) or one source cut into patient-level
partitions (iid / dirichlet / quantity; only its train split when the server evaluates on the val/test it
ships, see common.data.sources.server_holdout). Either way each hospital splits ITS OWN patients with
`patient_split` as `federation.local_split` says (by default a validation share, the rest trains), so no
patient is in two splits or two hospitals.

Decoding and resizing is the expensive part, so prepared datasets are cached per process: Flower's
simulation keeps its Ray actors alive across rounds and they reuse the cache. Deployment starts a fresh
ClientApp process per message (Flower 1.42), so a deployment node also keeps the prepared images on its own
disk (common/data/prepared_cache.py) in node config `cache-dir` (default `$FLWR_HOME/fedxray-cache`;
`cache-dir='none'` turns it off) and decodes its folder once, not once per message.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from client.site import safe_site
from common.settings import Settings
from common.data.dataset import XrayDataset
from common.data.sources import load_manifest, server_holdout, site_folders
from common.data.splits import MIN_SPLIT_PATIENTS, partition, patient_split
from common.errors import DataError
from common.data.prepare import build_datasets

log = logging.getLogger(__name__)
_CACHE: OrderedDict[str, "NodeData"] = OrderedDict()
CACHE_ENTRIES = 16   # one Ray actor serves several partitions; older settings are dropped, least recent first
_LOCK = threading.Lock()


@dataclass
class NodeData:
    site: str                        # a folder name or "partition-k": never a patient identifier
    findings: list[str]
    datasets: dict[str, XrayDataset]  # train / val / test
    multilabel: bool


@dataclass(frozen=True)
class NodeSource:
    """Where one node's data comes from (resolved from node config + run config)."""

    path: str
    source: str
    site: str
    partition_id: int | None = None     # set when one source is cut into partitions
    num_partitions: int | None = None
    cache_dir: str | None = None        # a deployment node's prepared-image cache (None: this process only)


def node_cache_dir(node_config: dict) -> str | None:
    """Where a deployment node keeps its prepared images: node config `cache-dir`, else $FLWR_HOME's."""
    value = str(node_config.get("cache-dir") or "")
    if value.lower() == "none":
        return None
    if value:
        return str(Path(value).expanduser().resolve())
    return str(Path(os.environ.get("FLWR_HOME") or "~/.flwr").expanduser().resolve() / "fedxray-cache")


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def resolve_source(node_config: dict, settings: Settings) -> NodeSource:
    """Deployment node config wins (`data-path`); otherwise simulation's partition of the run's data."""
    if node_config.get("data-path"):
        path = Path(str(node_config["data-path"])).expanduser().resolve()
        source = str(node_config.get("source") or "auto")
        site = safe_site(str(node_config.get("site") or path.name), str(path))   # it leaves the hospital
        return NodeSource(str(path), source, site, cache_dir=node_cache_dir(node_config))
    if "partition-id" not in node_config:
        raise DataError("this SuperNode has no data: start it with --node-config \"data-path='/path/to/hospital'\"",
                        failure="data-not-found")
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", 1))
    root = Path(settings.data.path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"run config data.path does not exist (resolved from working directory {Path.cwd()}); "
                        "create the demo data with `fedxray data synth --out data/synth` or pass an absolute "
                        "path with --run-config \"data.path='/abs/path'\"", path=str(root), failure="data-not-found")
    sites = sorted(site_folders(root), key=_natural_key)
    if sites:
        if pid >= len(sites):
            raise DataError(f"partition-id {pid} has no site folder: {root} holds {len(sites)} hospitals "
                            f"({[s.name for s in sites]}); run with num-supernodes <= {len(sites)}", path=str(root),
                            failure="data-layout")
        return NodeSource(str(sites[pid]), settings.data.source, safe_site(sites[pid].name, str(sites[pid])))
    return NodeSource(str(root), settings.data.source, f"partition-{pid}", pid, n)


def _node_settings(src: NodeSource, settings: Settings, findings: list[str] | None) -> Settings:
    """The run's settings for this node's own folder; the hospital's split follows federation.local_split."""
    source = src.source or "auto"   # load_manifest detects "auto", as for every command
    fractions = {"train": (1.0, 0.0, 0.0),
                 "train-val": (1 - settings.federation.local_val_fraction, settings.federation.local_val_fraction, 0.0),
                 "train-val-test": tuple(settings.data.split_fractions)}[settings.federation.local_split]
    return settings.updated(**{"data.path": src.path, "data.source": source, "data.split_fractions": list(fractions),
                               "data.official_split": "keep" if settings.federation.local_split == "train-val-test" else "resplit",
                               "data.findings": findings or settings.data.findings})


def _cache_key(src: NodeSource, settings: Settings, findings: list[str] | None) -> str:
    return json.dumps([src.path, src.source, src.site, src.partition_id, src.num_partitions, findings,
                       settings.federation.partition_method, settings.federation.partition_alpha,
                       settings.federation.local_split, settings.federation.local_val_fraction, settings.train.seed,
                       settings.data.model_dump(mode="json"), settings.preprocess.model_dump(),
                       settings.augment.model_dump()], sort_keys=True, default=str)


def load_node_data(node_config: dict, settings: Settings, findings: list[str] | None = None) -> NodeData:
    """This node's prepared train/val/test datasets (cached per process)."""
    src = resolve_source(node_config, settings)
    key = _cache_key(src, settings, findings)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _prepare(src, settings, findings)
            while len(_CACHE) > CACHE_ENTRIES:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return _CACHE[key]


def _prepare(src: NodeSource, settings: Settings, findings: list[str] | None) -> NodeData:
    cfg = _node_settings(src, settings, findings)
    manifest = load_manifest(cfg.data, site=src.site)
    if src.partition_id is not None:
        if server_holdout(settings.data.path, settings.federation.server_data_path) is None:
            # the server evaluates on this source's shipped val/test: the hospitals share out the rest
            manifest = manifest.subset([i for i, s in enumerate(manifest.samples) if s.split not in ("val", "test")])
        parts = partition(manifest, list(range(len(manifest.samples))), src.num_partitions,
                          settings.federation.partition_method, settings.federation.partition_alpha,
                          settings.train.seed, min_patients=MIN_SPLIT_PATIENTS)   # every node splits its part by patient
        manifest = manifest.subset(parts[src.partition_id])
    splits = patient_split(manifest, cfg.data)
    datasets = build_datasets(manifest, splits, cfg, progress=False, cache_dir=src.cache_dir)
    log.info("node %s: %s images train/val/test (federation.local_split=%s)", src.site,
             {k: len(v) for k, v in datasets.items()}, settings.federation.local_split)
    return NodeData(src.site, list(manifest.findings), datasets, manifest.multilabel)


def node_site(ctx, overrides: dict | None = None) -> str:
    """The site name this node's replies carry (client.data.resolve_source), or a fallback that never fails."""
    cfg = dict(ctx.node_config or {})
    try:
        return resolve_source(cfg, Settings.from_run_config(ctx.run_config, overrides)).site
    except Exception:  # noqa: BLE001 - a broken node still needs a name for its failure reply
        if cfg.get("data-path") or cfg.get("site"):
            return safe_site(str(cfg.get("site") or Path(str(cfg["data-path"])).name), str(cfg.get("data-path")))
        return f"partition-{cfg['partition-id']}" if "partition-id" in cfg else "unknown"


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
