"""The common finding vocabulary and the mappings from each public source onto it.

Canonical names are ChestX-ray14's (NIH) spelling. CheXpert names map onto them where the finding is the
same; CheXpert-only findings keep their own name, so two hospitals federate on the intersection of
what their sources label (see `shared_findings`).

| ChestX-ray14        | CheXpert                    |
|---------------------|-----------------------------|
| Atelectasis         | Atelectasis                 |
| Cardiomegaly        | Cardiomegaly                |
| Consolidation       | Consolidation               |
| Edema               | Edema                       |
| Effusion            | Pleural Effusion            |
| Pneumonia           | Pneumonia                   |
| Pneumothorax        | Pneumothorax                |
| Nodule, Mass        | (Lung Lesion: no 1:1 match) |
| Infiltration        | (Lung Opacity: no 1:1 match)|
| Emphysema, Fibrosis, Pleural_Thickening, Hernia | —   |
"""
from __future__ import annotations

CHESTXRAY14_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
CHESTXRAY14_NO_FINDING = "No Finding"

CHEXPERT_COLUMNS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
#: CheXpert column -> canonical name (identity where not listed).
CHEXPERT_TO_CANONICAL: dict[str, str] = {"Pleural Effusion": "Effusion"}
CHEXPERT_FINDINGS: tuple[str, ...] = tuple(
    CHEXPERT_TO_CANONICAL.get(c, c) for c in CHEXPERT_COLUMNS if c != "No Finding"
)

#: Finding vocabulary of MedMNIST files we know, in their label-index order.
MEDMNIST_FINDINGS: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("Pneumonia",),
    "chestmnist": CHESTXRAY14_FINDINGS,
}

_ALIASES = {name.lower().replace("_", " "): name for name in CHESTXRAY14_FINDINGS + CHEXPERT_FINDINGS}
_ALIASES.update({k.lower(): v for k, v in CHEXPERT_TO_CANONICAL.items()})
_ALIASES["pleural thickening"] = "Pleural_Thickening"
_ALIASES["infiltrate"] = "Infiltration"  # BBox_List_2017.csv spells it so


def canonical(name: str) -> str:
    """Canonical spelling of a finding name from any source; unknown names are returned stripped."""
    key = name.strip().lower().replace("_", " ")
    return _ALIASES.get(key, name.strip())


def shared_findings(*vocabularies: list[str] | tuple[str, ...]) -> list[str]:
    """Findings every vocabulary has, in the order of the first one (the federation's common head)."""
    sets = [{canonical(f) for f in v} for v in vocabularies[1:]]
    return [canonical(f) for f in vocabularies[0] if all(canonical(f) in s for s in sets)]
