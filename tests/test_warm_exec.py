"""The warm SuperExec's fork server: the heavy third-party libraries are imported before a task starts, and no
module of the project is (a task must import the ClientApp from the FAB its run ships, see fedxray/warm_exec.py).
The deployment tests (test_federated, test_security, test_hospital_boundary) run every ClientApp through it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedxray.warm_exec import PRELOAD

REPO = Path(__file__).resolve().parents[1]

PROJECT = ("client", "common", "server", "inference_api", "simulations", "benchmarks")


PROBE = """
import json, sys
out = sys.argv[1]
from fedxray.warm_exec import WarmExecutor
executor = WarmExecutor()
executor.start()
# builtins.exec as the target: the probe itself imports nothing of the project
probe = executor._ctx.Process(target=exec, args=(
    "import sys, json; open(" + repr(out) + ", 'w').write(json.dumps(sorted(sys.modules)))",))
probe.start()
probe.join(timeout=120)
executor.close()
sys.exit(probe.exitcode)
"""


def test_a_task_process_starts_with_the_libraries_and_without_the_app(tmp_path):
    out = tmp_path / "modules.json"
    # in a process of its own: the fork server lives as long as the process that started it
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = set(json.loads(out.read_text()))
    assert {"torch", "torchvision", "sklearn.metrics", "flwr.supernode.runtime.run_clientapp"} <= modules
    assert {m for m in PRELOAD if m.split(".")[0] in ("torch", "flwr")} <= modules
    leaked = sorted(m for m in modules if m.split(".")[0] in PROJECT)
    assert not leaked, f"project modules in the fork server: {leaked}"
