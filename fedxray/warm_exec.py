"""A hospital's SuperExec that starts each ClientApp task warm: `python -m fedxray.warm_exec` beside a SuperNode.

Flower 1.42 runs every message of a deployment in a new `flwr-clientapp` process (SuperNode
`--isolation subprocess` -> `flower-superexec` -> `SubprocessExecutor`), and each one spends 5-9 s importing
torch, torchvision, scikit-learn and flwr before it reads a byte of the message. Flower's warm-executor pools
serve only Kubernetes and other task types, so this process is `flower-superexec` itself
(`flwr.supercore.superexec.run_superexec`: the same Runtime API polling, task acquisition, auth and plugin)
with one part swapped: its executor. `WarmExecutor` keeps a fork server (Python's `multiprocessing`
"forkserver") that has imported those libraries once; each task is a fresh child forked from it that runs
Flower's own `run_clientapp` - the same code `flwr-clientapp` runs: it pulls the message and the FAB from
the SuperNode, installs the FAB and loads the ClientApp from it.

What is preloaded is third-party code only, never the app: the ClientApp and every module of the project
are imported in the child from the FAB the run ships (flwr's loader takes a module already in `sys.modules`
as is, so a preloaded app would run code the run did not send - signed apps included). That is also why this
module lives in the `fedxray` command package and not in `client`: the child imports it to find `_run_task`,
and `client` must not be in `sys.modules` before the FAB's copy is. One task, one process, as in Flower:
nothing of one task's memory reaches the next.

The SuperNode runs with `--isolation process`; both sides may share `--superexec-auth-secret-file`.
`server/launch.py` starts this next to every SuperNode; `--executor subprocess` is Flower's cold path
(kept for comparison, `benchmarks/sections/deployment.py`).
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

# Imported once by the fork server: what every ClientApp task needs and costs seconds to import. Third-party
# only (see the module docstring); a module that is not installed is skipped.
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "torchvision.models", "torchvision.transforms.v2",
           "scipy.ndimage", "sklearn.metrics", "opacus", "pydicom", "safetensors.torch", "tqdm.auto",
           "httpx", "flwr.app", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")

LAUNCHED_ENV = "FEDXRAY_TASK_LAUNCHED"   # wall-clock time the SuperExec launched this task


def _poll_local_supernode_fast() -> None:
    """The SuperNode creates a task before it has pulled the message's objects from the SuperLink, and
    Flower's object pull backs off from 1 s, doubling (`pull_and_inflate_object_from_tree`, `pull_objects`:
    initial_backoff=1, backoff_cap=10): a task started warm would sleep 1 + 2 s for weights that arrive a
    few hundred ms later. The SuperNode is on this machine, so this task retries from 50 ms, capped at
    0.5 s; Flower's defaults are keyword-only parameters, changed for this process only."""
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__.update(initial_backoff=0.05, backoff_cap=0.5)


def _run_task(spec, launched: float) -> None:
    """One ClientApp task in a child of the fork server: Flower's `flwr-clientapp` entry, minus the imports."""
    os.environ[LAUNCHED_ENV] = repr(launched)   # client.app logs the start-up cost from here
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    _poll_local_supernode_fast()
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


class WarmExecutor:
    """Flower's `Executor` protocol: ClientApp tasks forked warm, any other task type started as Flower does."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._cold = SubprocessExecutor()
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(PRELOAD))   # a missing one is skipped
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the fork server now (it imports PRELOAD: seconds), so the first task does not wait for it."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    # -- the Executor protocol (flwr.supercore.superexec.executor.types.Executor) --------------------
    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return self._cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                                root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        """No capacity gate, like Flower's subprocess executor."""

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._cold.launch(spec)
        try:
            child = self._ctx.Process(target=_run_task, args=(spec, time.time()), name=f"clientapp-task-{spec.task_id}")
            child.start()
        except Exception as e:  # noqa: BLE001 - the fork server is gone: say so, Flower marks the task failed
            log.error("warm start of task %s failed: %s", spec.task_id, e)
            return LaunchResult.failed(f"warm ClientApp start failed: {type(e).__name__}")
        with self._lock:
            self._children.append(child)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished tasks (no zombies between polls)."""
        with self._lock:
            self._children = [c for c in self._children if c.is_alive()]

    def close(self) -> None:
        """SuperExec shuts down: its tasks end with it (each also watches its parent's pid)."""
        with self._lock:
            children, self._children = self._children, []
        for c in children:
            if c.is_alive():
                c.terminate()
        for c in children:
            c.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    """`flower-superexec`'s command line, with the warm executor (or Flower's own with --executor subprocess)."""
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")   # the package re-exports the function
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")

    parser = cli._parse_args()
    parser.description = "A hospital's Flower SuperExec that starts ClientApp tasks from a warm fork server."
    args = parser.parse_args(argv)
    if args.executor == "subprocess" and "--executor" not in (argv if argv is not None else sys.argv[1:]):
        executor = WarmExecutor()
        executor.start()
        superexec.get_executor = lambda *a, **k: executor   # the one part swapped; see the module docstring
    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli.flower_superexec()


if __name__ == "__main__":
    main()
