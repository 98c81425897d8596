"""The operator's view of a run: the ServerApp writes one line per round carrying PROGRESS into Flower's log;
launchers pick those lines (and errors) out of the stream they read and print them, nothing else."""
from __future__ import annotations

import re

PROGRESS = "fedxray | "


def print_progress(line: str) -> None:
    """`on_line` for a person watching a `flwr run --stream`: the per-round lines and errors."""
    if PROGRESS in line:
        print(line.split(PROGRESS, 1)[1].rstrip(), flush=True)
    elif re.match(r"^\s*ERROR\s*:", line):
        print(line.rstrip(), flush=True)
