"""The data report: counts per finding and split, excluded files with reasons (`fedxray data check`)."""
from __future__ import annotations

from common.data.manifest import Manifest
from common.data.splits import split_overlap


def data_report(manifest: Manifest, splits: dict[str, list[int]]) -> dict:
    return {
        "source": manifest.source,
        "root": str(manifest.root),
        "findings": manifest.findings,
        "images": sum(len(v) for v in splits.values()),
        "patients": manifest.patients([i for v in splits.values() for i in v]),
        "patient_ids": manifest.patient_ids,
        "patients_in_two_splits": split_overlap(manifest, splits),
        "splits": {name: {"images": len(idx), "patients": manifest.patients(idx),
                          "positives": manifest.finding_counts(idx)} for name, idx in splits.items()},
        "excluded": [{"file": e.key, "reason": e.reason} for e in manifest.excluded],
        "notes": list(manifest.notes),
    }


def format_report(report: dict, max_excluded: int = 20) -> str:
    names = list(report["splits"])
    w = max([len(f) for f in report["findings"]] + [12])
    lines = [f"source: {report['source']}   root: {report['root']}",
             f"images: {report['images']}   patients: {report['patients']}   excluded: {len(report['excluded'])}",
             f"patient ids: {report['patient_ids'] or 'as the source gives them'}",
             "", f"{'':<{w}} " + " ".join(f"{n:>12}" for n in names),
             f"{'images':<{w}} " + " ".join(f"{report['splits'][n]['images']:>12}" for n in names),
             f"{'patients':<{w}} " + " ".join(f"{report['splits'][n]['patients']:>12}" for n in names)]
    for f in report["findings"]:
        lines.append(f"{f:<{w}} " + " ".join(f"{report['splits'][n]['positives'][f]:>12}" for n in names))
    overlap = report["patients_in_two_splits"]
    if any(overlap.values()):
        lines.append("patients in two splits: " + ", ".join(f"{pair} {n}" for pair, n in overlap.items()))
    if report["excluded"]:
        lines += ["", "excluded files:"]
        lines += [f"  {e['file']}: {e['reason']}" for e in report["excluded"][:max_excluded]]
        if len(report["excluded"]) > max_excluded:
            lines.append(f"  ... and {len(report['excluded']) - max_excluded} more (see the JSON report)")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
