"""Patient-level, finding-stratified, seeded splits and the partitioners that make simulated hospitals.

Every function works on *groups* (a patient at a site), never on single images, so no patient can appear
in two splits or two hospitals. Assignment is greedy towards target image counts within each stratum
(the patient's rarest positive finding), which keeps finding prevalence close across splits.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np

from common.settings import DataConfig
from common.data.manifest import Manifest
from common.errors import DataError

SPLITS = ("train", "val", "test")
MIN_SPLIT_PATIENTS = 3   # a data set split by patient needs one each for train, val and test


def _groups(manifest: Manifest, indices: list[int]) -> dict[str, list[int]]:
    g: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        g[manifest.samples[i].group].append(i)
    return dict(sorted(g.items()))


def _strata(manifest: Manifest, groups: dict[str, list[int]]) -> dict[int, list[str]]:
    """Stratum of a patient = index of its rarest positive finding (-1: none), by prevalence in `groups`."""
    y = np.nan_to_num(manifest.label_matrix([i for idx in groups.values() for i in idx]))
    prevalence = y.sum(axis=0) if len(y) else np.zeros(len(manifest.findings))
    order = np.argsort(prevalence, kind="stable")  # rarest first
    rank = {int(f): r for r, f in enumerate(order)}
    strata: dict[int, list[str]] = defaultdict(list)
    for name, idx in groups.items():
        pos = np.nonzero(np.nan_to_num(manifest.label_matrix(idx)).max(axis=0) > 0)[0]
        strata[min(pos, key=lambda f: rank[int(f)]) if len(pos) else -1].append(name)
    return dict(sorted(strata.items()))


def _allocate(manifest: Manifest, indices: list[int], weights: list[float], seed: int) -> list[list[int]]:
    """Assign whole patients to len(weights) bins so each bin's image count tracks its weight, per stratum."""
    rng = np.random.default_rng(seed)
    groups = _groups(manifest, indices)
    bins: list[list[int]] = [[] for _ in weights]
    w = np.asarray(weights, float) / max(sum(weights), 1e-12)
    filled, assigned = np.zeros(len(w)), 0
    for _, names in _strata(manifest, groups).items():   # strata one after another: each is spread evenly
        for n in (names[k] for k in rng.permutation(len(names))):
            assigned += len(groups[n])
            b = int(np.argmax(np.where(w > 0, w * assigned - filled, -np.inf)))
            bins[b].extend(groups[n])
            filled[b] += len(groups[n])
    return [sorted(b) for b in bins]


def patient_split(manifest: Manifest, cfg: DataConfig) -> dict[str, list[int]]:
    """train/val/test indices by patient.

    data.official_split=keep: a test or val split the source ships is used as shipped, and the splits it does
    not ship are made from the other patients by split_fractions. resplit: the shipped split is ignored.
    """
    all_idx = list(range(len(manifest.samples)))
    official = {s.split for s in manifest.samples}
    fractions = dict(zip(SPLITS, cfg.split_fractions))
    shipped = [name for name in ("val", "test") if name in official]
    if cfg.official_split == "keep" and shipped:
        splits = {name: [i for i in all_idx if manifest.samples[i].split == name] for name in shipped}
        rest = [i for i in all_idx if manifest.samples[i].split not in shipped]
        made = [name for name in SPLITS if name not in shipped]
        splits.update(zip(made, _allocate(manifest, rest, [fractions[n] for n in made], cfg.seed)))
        splits = {name: splits[name] for name in SPLITS}
        _check_official_leak(manifest, splits)
    else:
        if shipped:
            manifest.notes.append(f"the shipped {'/'.join(shipped)} split is ignored (data.official_split=resplit): "
                                  f"a fresh patient-level split by data.split_fractions {cfg.split_fractions}")
        splits = dict(zip(SPLITS, _allocate(manifest, all_idx, list(cfg.split_fractions), cfg.seed)))
    if cfg.max_samples:
        rng = np.random.default_rng(cfg.seed)
        splits = {k: sorted(rng.permutation(v)[: cfg.max_samples].tolist()) if len(v) > cfg.max_samples else v
                  for k, v in splits.items()}
    for name in SPLITS:
        wanted = fractions[name] > 0 or (name in official and cfg.official_split == "keep")
        if wanted and not splits[name]:
            raise DataError(f"the {name} split is empty ({len(manifest.samples)} images from "
                            f"{manifest.patients()} patients): add data or change data.split_fractions",
                            path=str(manifest.root), failure="data-too-small")
    return splits


def _shown(group: str) -> str:
    """A patient as a person reads it: `site/id`, or the id alone when the data has no site."""
    return group[1:] if group.startswith("/") else group


def _owners(manifest: Manifest, splits: dict[str, list[int]]) -> dict[str, set[str]]:
    """Patient (group) -> the splits holding images of it."""
    owners: dict[str, set[str]] = defaultdict(set)
    for name, idx in splits.items():
        for i in idx:
            owners[manifest.samples[i].group].add(name)
    return owners


def split_overlap(manifest: Manifest, splits: dict[str, list[int]]) -> dict[str, int]:
    """Patients with images in both splits of each pair, e.g. {"train/val": 15, "train/test": 8, "val/test": 9}."""
    owners = _owners(manifest, splits).values()
    return {f"{a}/{b}": sum(1 for o in owners if a in o and b in o) for a, b in combinations(splits, 2)}


def _check_official_leak(manifest: Manifest, splits: dict[str, list[int]], examples: int = 3) -> None:
    """An official split that puts one patient on two sides leaks; count every such patient, per pair of splits."""
    counts = split_overlap(manifest, splits)
    if not any(counts.values()):
        return
    owners = _owners(manifest, splits)
    straddling = sorted(g for g, o in owners.items() if len(o) > 1)
    pairs = ", ".join(f"{pair}: {n}" for pair, n in counts.items() if n)
    manifest.notes.append(f"the shipped split puts {len(straddling)} patients in more than one split ({pairs}); "
                          "kept as shipped, so validation and test scores are optimistic. Set "
                          "data.official_split=resplit for a fresh patient-level split by data.split_fractions.")
    shown = [_shown(g) for g in straddling[:examples]]
    manifest.notes.append(f"patients in more than one shipped split, for example: {', '.join(shown)}"
                          + (f" (and {len(straddling) - len(shown)} more)" if len(straddling) > len(shown) else ""))


def assert_no_patient_overlap(manifest: Manifest, parts: dict[str, list[int]] | list[list[int]]) -> None:
    items = parts.items() if isinstance(parts, dict) else enumerate(parts)
    owner: dict[str, object] = {}
    for name, idx in items:
        for i in idx:
            g = manifest.samples[i].group
            if owner.setdefault(g, name) != name:
                raise AssertionError(f"patient {_shown(g)} is in both {owner[g]!r} and {name!r}")


# --------------------------------------------------------------------------------------------- partitions

PARTITIONERS = ("iid", "dirichlet", "quantity", "by-site")


def partition(manifest: Manifest, indices: list[int], num_partitions: int, method: str = "iid",
              alpha: float = 0.5, seed: int = 0, min_size: int = 2, min_patients: int = 1) -> list[list[int]]:
    """Split `indices` into hospitals without cutting a patient.

    Skewed draws are redrawn (up to 100 times) until every hospital has `min_size` images from
    `min_patients` patients: a hospital that must split its own train/val/test needs at least three.

    iid: stratified, equal sizes. dirichlet: each stratum's patients spread by Dir(alpha) proportions
    (label skew; small alpha = more skew). quantity: sizes by Dir(alpha), labels iid. by-site: one
    hospital per `Sample.site` (num_partitions must equal the number of sites).
    """
    if method not in PARTITIONERS:
        raise ValueError(f"unknown partition method {method!r}; choose one of {PARTITIONERS}")
    if method == "by-site":
        sites = sorted({manifest.samples[i].site for i in indices})
        if num_partitions not in (0, len(sites)):
            raise ValueError(f"by-site gives {len(sites)} hospitals ({sites}), not {num_partitions}")
        return [sorted(i for i in indices if manifest.samples[i].site == s) for s in sites]
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if method == "iid":
        return _allocate(manifest, indices, [1.0] * num_partitions, seed)
    rng = np.random.default_rng(seed)
    groups = _groups(manifest, indices)
    for attempt in range(100):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        if method == "quantity":
            parts = _allocate(manifest, indices, list(rng.dirichlet([alpha] * num_partitions) + 1e-3), seed + attempt)
        else:
            for _, names in _strata(manifest, groups).items():
                p = rng.dirichlet([alpha] * num_partitions)
                names = [names[k] for k in rng.permutation(len(names))]
                cuts = (np.cumsum(p) * len(names)).round().astype(int)[:-1]
                for h, chunk in enumerate(np.split(np.array(names, dtype=object), cuts)):
                    for n in chunk:
                        parts[h].extend(groups[n])
        if (min(len(p) for p in parts) >= min_size
                and min(manifest.patients(p) for p in parts) >= min_patients):
            return [sorted(p) for p in parts]
    raise DataError(f"could not make {num_partitions} {method} partitions with at least {min_size} images and "
                    f"{min_patients} patients each from {len(indices)} images of {len(groups)} patients "
                    f"(alpha={alpha}); use fewer hospitals or a larger alpha", failure="data-too-small")
