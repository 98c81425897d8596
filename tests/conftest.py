"""Shared fixtures. Flower is kept local and quiet; heavy fixtures are session-scoped and tiny."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# Every process a test starts inherits this (subprocess and Flower pass os.environ on): how the session recognises
# its own processes at the end, also those re-parented after their parent died or started in their own session.
SESSION_MARK = "PYTEST_FEDXRAY_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PNEUMONIAMNIST = SHARED_DATA / "pneumoniamnist.npz"
SYNTH_FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]


# ------------------------------------------------------------------------------------------ order
# the files that take longest, longest first (serial seconds on 2 cores, `--durations`, 2026-12-02): started
# first, they do not trail after the quick ones
LONGEST = ("test_federated.py", "test_standing.py", "test_simulations.py", "test_security.py",
           "test_hospital_boundary.py", "test_bench.py", "test_privacy.py", "test_jobs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, then the other files with slow or integration tests, then the rest; each file's
    tests in their own order. `make test` runs files on parallel workers (pytest-xdist, --dist loadfile: a
    module's fixtures are built once); a long file started last would trail after everything else."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("integration")}

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST.index(name) if name in LONGEST else len(LONGEST) + (item.path not in heavy)

    items.sort(key=rank)   # stable: the order within each file is kept


# ------------------------------------------------------------------------------------------ nothing left running
_PROGRAMS = ("flwr", "flower-", "fedxray", "raylet", "gcs_server")        # Flower's, ours and Ray's executables
_MODULES = ("common.", "client.", "server.", "simulations.", "inference_api.", "flwr", "ray", "uvicorn")
_PACKAGES = tuple(f"{os.sep}site-packages{os.sep}{p}{os.sep}" for p in ("flwr", "ray"))   # their scripts


def is_fedxray_or_flower(cmdline: list[str]) -> bool:
    """A fedxray, Flower or Ray process, by what it runs (program, `-m` module, script in their package, Ray's
    `ray::` process titles), never by the folders in its command line (the repository's own path may be
    .../fedxray/.venv/bin/python, as every Python process of the session is)."""
    if not cmdline:
        return False
    if cmdline[0].startswith("ray::") or any(pkg in arg for arg in cmdline for pkg in _PACKAGES):
        return True
    args = cmdline[1:] if Path(cmdline[0]).name.startswith("python") else cmdline
    args = [a for a in args if a not in ("-u", "-B", "-E", "-s", "-O")]   # interpreter flags before the program
    if not args:
        return False
    if args[0] == "-m":
        return len(args) > 1 and args[1].startswith(_MODULES)
    return Path(args[0]).name.startswith(_PROGRAMS) or Path(args[0]).name == "ray"


def started_here_and_running(basetemp: str) -> list[psutil.Process]:
    """Live processes (zombies aside) of this session: carrying its SESSION_MARK, descending from this process, or
    naming a folder under the session's base temp dir; of those, the ones that run fedxray/Flower/Ray, or name
    such a folder."""
    me, token = psutil.Process(), os.environ[SESSION_MARK]
    try:
        family = {p.pid for p in me.children(recursive=True)}
    except psutil.Error:
        family = set()
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.pid == me.pid or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = p.info["cmdline"] or []
            names_tmp = any(basetemp in arg for arg in cmdline)
            if not (names_tmp or p.pid in family or p.environ().get(SESSION_MARK) == token):
                continue
            if names_tmp or is_fedxray_or_flower(cmdline):
                out.append(p)
        except psutil.Error:   # gone meanwhile, or another user's (no environ to read): not ours
            continue
    return out


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running(tmp_path_factory):
    """After the last test, however the session was selected (-k, one file, one test): no fedxray, Flower or Ray
    process a test started is still running. Children finish their own shutdown a moment after their parent, so
    this waits up to 30 s for them; whatever is left fails the session (an error in the last test's teardown)
    and is then stopped, so one leak does not pile up over runs."""
    basetemp = str(tmp_path_factory.getbasetemp())
    yield
    deadline = time.monotonic() + 30
    while (left := started_here_and_running(basetemp)) and time.monotonic() < deadline:
        time.sleep(1)
    if not left:
        return
    names = []
    for p in left:
        try:
            names.append(f"pid {p.pid}: {' '.join(p.cmdline()[:4])}")
            p.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(left, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    pytest.fail("processes started by the tests were still running at the end of the session (now stopped): "
                + "; ".join(names), pytrace=False)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three small synthetic hospitals + holdout, 64 px, written once per test session."""
    from common.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, hospitals=3, patients=40, size=64, seed=1, progress=False)
    return root


@pytest.fixture
def pneumoniamnist() -> Path:
    if not PNEUMONIAMNIST.is_file():
        pytest.skip(f"real data not available: {PNEUMONIAMNIST} (only in the fedxray workplace's ../shared/data)")
    return PNEUMONIAMNIST


@pytest.fixture
def task_identity():
    """Messages created outside a Flower runtime need a task identity, as run_simulation sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class StandInGrid:
    """Just enough of Flower's Grid for GuardedGrid and the strategies, without a runtime: the connected node ids,
    and replies made by `reply(message)`, by default `answer(message) -> reply Message | None` (None: that node
    stays silent). Message ids are given on push, each reply comes from the node its message went to."""

    def __init__(self, nodes, answer=None):
        self.nodes, self.answer, self.pushed, self.pushes = list(nodes), answer, [], 0

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, msgs):
        self.pushed, self.pushes = list(msgs), self.pushes + 1
        for i, m in enumerate(self.pushed):
            m.metadata.__dict__["_message_id"] = f"m{self.pushes}-{i}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, ids):
        out = []
        for m in self.pushed:
            reply = self.reply(m)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                out.append(reply)
        return out

    def reply(self, message):
        return self.answer(message)
