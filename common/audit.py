"""Audit what left the hospitals: search files for the strings that identify a hospital's patients.

`identifying_strings` lists, for a hospital's data folder, what must never appear outside it: the folder's
path, every image file name, every patient id (ChestX-ray14 names start with it: `00012345_003.png`), and
the "CSV:line" form an error message would use. `find_identifying` searches files byte by byte (SQLite
databases and logs included) and returns what it found where. Tests and benchmarks/reliability.py run it over
everything the server side holds after a run; an operator can run it the same way on a test federation.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from common.data.sources import IMAGE_SUFFIXES, NIH_CSV_NAMES


def identifying_strings(hospital: str | Path) -> set[str]:
    """What must never leave this data folder (see the module docstring)."""
    root = Path(hospital)
    out = {str(root.resolve()), *(f"{name}:" for name in NIH_CSV_NAMES)}
    for name in NIH_CSV_NAMES:
        table = root / name
        if table.is_file():
            with open(table, newline="") as fh:
                for row in list(csv.reader(fh))[1:]:
                    if row:
                        out.add(row[0])
                        if len(row) > 3 and row[3].strip():
                            out.add(row[0].split("_")[0])      # the 8-digit patient prefix of the file name
    if root.is_dir():
        out |= {p.name for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    return {s for s in out if s}


def files_under(*roots: str | Path) -> list[Path]:
    files: list[Path] = []
    for r in map(Path, roots):
        files += [r] if r.is_file() else [p for p in r.rglob("*") if p.is_file()] if r.is_dir() else []
    return files


def find_identifying(strings: Iterable[str], files: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(file, string) for every identifying string found in any of the files."""
    needles = [(s, s.encode()) for s in set(strings)]
    found = []
    for f in files:
        try:
            data = Path(f).read_bytes()
        except OSError:
            continue
        found += [(str(f), s) for s, b in needles if b in data]
    return sorted(found)
