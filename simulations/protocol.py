"""The data protocol, in one place, so every arm of an experiment is fair.

1. The source is split by patient into global train / val / test (`common.data.patient_split`; a source's
   official test split is kept). Global val and test never reach a hospital: the server's validation set
   (round selection, thresholds) and the one held-out test set every arm is scored on.
2. Global train is partitioned into hospitals (`common.data.partition`: iid, dirichlet, quantity, by-site),
   patient-level.
3. Each hospital's partition is split by patient into its own train / val / test. Hospitals train on their
   train part only; their val part is what a hospital alone (local-only arm) selects epochs with; their
   test part is where per-hospital and cross-site metrics come from. Centralised pools the hospitals'
   train parts, so it sees exactly the images the federation sees.
4. With a warm start, a public slice of global train's patients is taken out before step 2 (`carve_public`):
   the warm start trains on it alone, and no hospital holds those patients (global/public in the overlap check).

`Protocol.to_json()` is written next to the results (partition.json) so a run can be audited.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.settings import DataConfig
from common.data.manifest import Manifest
from common.data.splits import MIN_SPLIT_PATIENTS, assert_no_patient_overlap, partition, patient_split
from common.errors import DataError

HOSPITAL_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PartitionSpec:
    """How global train is cut into hospitals; `name` labels the results (e.g. 'dirichlet-0.3')."""

    method: str = "iid"
    alpha: float = 0.5
    hospitals: int = 3

    @property
    def name(self) -> str:
        return f"{self.method}-{self.alpha:g}" if self.method in ("dirichlet", "quantity") else self.method


@dataclass
class Hospital:
    name: str
    splits: dict[str, list[int]]          # train / val / test sample indices into the manifest

    @property
    def train(self) -> list[int]:
        return self.splits["train"]


@dataclass
class Protocol:
    manifest: Manifest
    spec: PartitionSpec
    global_splits: dict[str, list[int]]   # "val" and "test" (and the "train" pool that was partitioned)
    hospitals: list[Hospital] = field(default_factory=list)
    seed: int = 0

    @property
    def pooled_train(self) -> list[int]:
        return sorted(i for h in self.hospitals for i in h.train)

    def all_parts(self) -> dict[str, list[int]]:
        """Every disjoint part, named; used for the no-patient-overlap check."""
        parts = {f"global/{k}": v for k, v in self.global_splits.items() if k != "train"}
        parts.update({f"{h.name}/{k}": v for h in self.hospitals for k, v in h.splits.items()})
        return parts

    def check(self) -> None:
        """Raises AssertionError if any patient is in two parts (hospitals or splits)."""
        assert_no_patient_overlap(self.manifest, self.all_parts())

    def to_json(self) -> dict:
        """Auditable record: sample keys and patient groups of every part, plus label counts."""
        s = self.manifest.samples

        def describe(idx: list[int]) -> dict:
            y = self.manifest.label_matrix(idx)
            return {"images": len(idx), "patients": self.manifest.patients(idx),
                    "positives": self.manifest.finding_counts(idx),
                    "no_finding": int((np.nan_to_num(y).sum(1) == 0).sum()) if len(idx) else 0,
                    "keys": [s[i].key for i in idx], "patient_groups": sorted({s[i].group for i in idx})}

        return {"partition": {"method": self.spec.method, "alpha": self.spec.alpha, "name": self.spec.name,
                              "hospitals": len(self.hospitals), "seed": self.seed},
                "findings": list(self.manifest.findings), "source": self.manifest.source,
                "root": str(self.manifest.root),
                "global": {k: describe(v) for k, v in self.global_splits.items() if k != "train"},
                "hospitals": {h.name: {k: describe(v) for k, v in h.splits.items()} for h in self.hospitals}}


def carve_public(manifest: Manifest, indices: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(public, rest): a random `fraction` of the patients of `indices`, whole patients only. The seed is fixed
    per experiment, so every partition (and every arm) loses the same public patients."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(manifest.samples[i].group, []).append(i)
    names = sorted(groups)
    order = np.random.default_rng([seed, 7919]).permutation(len(names))
    k = int(round(fraction * len(names)))
    if not 0 < k < len(names):
        raise DataError(f"warm_start.public_fraction={fraction} of {len(names)} training patients leaves no public "
                        "or no private patients")
    public = sorted(i for j in order[:k] for i in groups[names[j]])
    taken = set(public)
    return public, [i for i in indices if i not in taken]


def build_protocol(manifest: Manifest, data_cfg: DataConfig, spec: PartitionSpec,
                   hospital_split: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                   public_fraction: float = 0.0) -> Protocol:
    """Global patient split -> (a public slice for a warm start, `public_fraction` of global train's patients,
    kept out of every hospital) -> partition of the rest of global train into hospitals -> each hospital's own
    split."""
    global_splits = patient_split(manifest, data_cfg)
    if public_fraction:
        global_splits["public"], global_splits["train"] = carve_public(manifest, global_splits["train"],
                                                                       public_fraction, seed)
    n = 0 if spec.method == "by-site" else spec.hospitals
    parts = partition(manifest, global_splits["train"], n, spec.method, spec.alpha, seed,
                      min_patients=MIN_SPLIT_PATIENTS)
    width = len(str(len(parts)))
    names = ([manifest.samples[p[0]].site or f"site_{k + 1}" for k, p in enumerate(parts)]
             if spec.method == "by-site" else [f"hospital_{k + 1:0{width}d}" for k in range(len(parts))])
    hospitals = [Hospital(name, split_hospital(manifest, idx, hospital_split, seed + k, name))
                 for k, (name, idx) in enumerate(zip(names, parts, strict=True))]
    proto = Protocol(manifest, spec, global_splits, hospitals, seed)
    proto.check()
    return proto


def split_hospital(manifest: Manifest, indices: list[int], fractions: tuple[float, float, float], seed: int,
                   name: str) -> dict[str, list[int]]:
    """One hospital's partition -> its own train/val/test, by patient and stratified by finding.

    A hospital too small for the fractions (a split would be empty) still gets one patient in val and one
    in test when it has three or more patients, so every hospital can select a model and be scored."""
    sub = manifest.subset(indices)
    cfg = DataConfig(split_fractions=fractions, official_split="resplit", seed=seed)
    idx = np.asarray(indices)
    try:
        local = patient_split(sub, cfg)   # official_split=resplit: the hospital splits its own data
    except DataError:
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(sub.samples):
            groups.setdefault(s.group, []).append(i)
        if len(groups) < MIN_SPLIT_PATIENTS:
            raise DataError(f"{name} has {len(indices)} images from {len(groups)} patients: too few for its own "
                            "train/val/test split; use fewer hospitals, a larger alpha or more data") from None
        names = [list(groups)[k] for k in np.random.default_rng(seed).permutation(len(groups))]
        local = {"test": groups[names[0]], "val": groups[names[1]], "train": [i for n in names[2:] for i in groups[n]]}
    return {k: sorted(idx[local[k]].tolist()) for k in HOSPITAL_SPLITS}
