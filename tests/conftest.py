"""Shared fixtures. Flower is kept local and quiet; heavy fixtures are session-scoped and tiny."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PNEUMONIAMNIST = SHARED_DATA / "pneumoniamnist.npz"
SYNTH_FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]


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
