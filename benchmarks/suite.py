"""`make bench` / `python -m benchmarks`: every hot path against its limit, one table, one JSON file.

    .venv/bin/python -m benchmarks [--quick] [--sections deployment,inference,...] [--out benchmarks/results]

Each section (`benchmarks/sections/<name>.py: rows(quick) -> list[Row]`) runs in a fresh interpreter, so its
peak memory and its torch threads are its own, and measures the product's code path beside the reference it
is judged against *in the same run* (absolute times on a shared 2-core host swing 2-3x; ratios taken side
by side do not). A row: what, our figure, the reference, ratio = ours / reference, the goal on that ratio,
met or not. `--quick` is the smoke run a test executes: tiny sizes, the same code, the table's shape only.

Writes <out>/bench.json (the latest full run, committed; a subset of sections: bench-<a+b>.json, --quick:
...-quick.json), with the machine: CPU model, cores, torch / flwr / opacus / onnxruntime versions, load
average at start and end.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ("deployment", "inference", "api", "training", "privacy", "wire", "secagg")  # table order; others follow


def sections() -> list[str]:
    """The sections present under benchmarks/sections/, in table order."""
    import pkgutil
    found = {m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "sections")]) if not m.name.startswith("_")}
    return [s for s in ORDER if s in found] + sorted(found - set(ORDER))


@dataclass
class Row:
    """One measured figure beside its reference. `goal_max`/`goal_min` bound the ratio; neither = informational."""

    what: str
    ours: float | None
    unit: str
    reference: float | None = None
    reference_what: str = ""
    goal_max: float | None = None
    goal_min: float | None = None
    note: str = ""
    section: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    @property
    def goal(self) -> str:
        if self.goal_max is not None:
            return f"<= {self.goal_max:g}x"
        if self.goal_min is not None:
            return f">= {self.goal_min:g}x"
        return ""

    @property
    def met(self) -> bool | None:
        r = self.ratio
        if r is None or (self.goal_max is None and self.goal_min is None):
            return None
        return (self.goal_max is None or r <= self.goal_max) and (self.goal_min is None or r >= self.goal_min)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "goal": self.goal, "met": self.met}

    @classmethod
    def from_json(cls, d: dict) -> Row:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------- machine
def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - a missing optional package is reported as absent
        return None


def machine() -> dict:
    """What the numbers were measured on (CPU model, cores, library versions)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": {m: _version(m) for m in ("torch", "torchvision", "flwr", "opacus", "onnxruntime", "fastapi")}}


# ------------------------------------------------------------------------------------------- running
def run_section(name: str, quick: bool) -> list[Row]:
    """One section in a fresh interpreter; a failing section becomes one row that says so (the rest still run)."""
    cmd = [sys.executable, "-m", "benchmarks.suite", "--worker", name] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=None, text=True)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"rows"')]
    if proc.returncode != 0 or not lines:
        return [Row(what=f"{name}: section failed (exit {proc.returncode}); its error is printed above", ours=None,
                    unit="", section=name, note="failed")]
    rows = [Row.from_json(r) for r in json.loads(lines[-1])["rows"]]
    for r in rows:
        r.section = name
        r.detail.setdefault("section_seconds", round(seconds, 1))
    return rows


def _worker(name: str, quick: bool) -> None:
    module = importlib.import_module(f"benchmarks.sections.{name}")
    rows = module.rows(quick)
    print(json.dumps({"rows": [r.to_json() for r in rows]}), flush=True)


# ------------------------------------------------------------------------------------------- output
def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    text = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{text} {unit}".strip()


def format_table(rows: list[Row]) -> str:
    heads = ["section", "what", "ours", "reference", "ratio", "goal", "met"]
    cells = [heads] + [[r.section, r.what, _num(r.ours, r.unit), _num(r.reference, r.unit),
                        "" if r.ratio is None else f"{r.ratio:.2f}x", r.goal,
                        {True: "met", False: "MISSED", None: ""}[r.met]] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(heads))]
    line = lambda c: " | ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()  # noqa: E731
    out = [line(cells[0]), "-+-".join("-" * w for w in widths)] + [line(c) for c in cells[1:]]
    notes = [f"  [{r.section}] {r.what}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", "notes:"] + notes if notes else []))


def format_markdown(rows: list[Row]) -> str:
    """The same table for a closing note or NOTES.md."""
    out = ["| section | what | ours | reference | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "met", False: "**missed**", None: ""}[r.met]
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}×"
        ref = _num(r.reference, r.unit) + (f" ({r.reference_what})" if r.reference_what else "")
        out.append(f"| {r.section} | {r.what} | {_num(r.ours, r.unit)} | {ref} | {ratio} | {r.goal} | {met} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, the same code paths")
    ap.add_argument("--sections", default=",".join(sections()), help=f"comma-separated subset of {','.join(sections())}")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.quick)
        return 0
    names = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(sections()))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections())}")
    started = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg": list(os.getloadavg())}
    t0 = time.perf_counter()
    rows: list[Row] = []
    for i, name in enumerate(names, 1):
        print(f"[bench {i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        section_rows = run_section(name, a.quick)
        rows += section_rows
        print(format_table(section_rows), file=sys.stderr, flush=True)
    result = {"quick": a.quick, "machine": machine(), "started": started,
              "ended": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg": list(os.getloadavg())},
              "seconds": round(time.perf_counter() - t0, 1), "sections": names, "rows": [r.to_json() for r in rows]}
    a.out.mkdir(parents=True, exist_ok=True)
    subset = "" if names == sections() else "-" + "+".join(names)   # a partial run never replaces the full one
    path = a.out / f"bench{subset}{'-quick' if a.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {result['seconds']} s; load average {started['loadavg'][0]:.2f} at start, "
          f"{result['ended']['loadavg'][0]:.2f} at end; written to {path}")
    return 1 if any(r.note == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
