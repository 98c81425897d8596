"""A Grid wrapper between Flower's strategy and the real Grid: bounded waits, float16 transport, bookkeeping.

* Flower's `sample_nodes` polls `get_node_ids()` once a second FOR EVER until `min_available_nodes` are
  connected. Here that poll fails with NotEnoughNodes after `node_wait_timeout` seconds, naming how many
  nodes did connect.
* With fp16 on, outgoing weights are cast to float16 and replies cast back to float32 before the strategy
  aggregates them, so only the wire format changes.
* Replies are pulled through the Grid's own push/pull API, first every 20 ms, backing off to
  `pull_interval` (0.5 s), instead of Flower's fixed 3 s (HTTP grid) / 0.1 s (simulation): quick replies
  are seen at once, slow rounds cost few requests.
* Every reply is recorded (node, site, metrics, bytes) so the server can write per-round, per-hospital
  history and provenance without touching the strategy.
* A reply that cannot be aggregated is rejected here, named in the log and the history, and kept from the
  strategy (`reply_problem`): arrays that do not match what was sent (keys, shapes, kinds), NaN/inf weights,
  a missing or non-positive num-examples, or metrics shaped unlike the other hospitals'. Flower's strategies
  would otherwise end the whole run on one inconsistent reply, broadcast a wrong shape, or average the NaN
  into everyone's model. Then the guards against a hostile hospital (server/guards.py) bound num-examples
  and exclude update-size / direction outliers; what they found goes into the reply's history row ("guard").
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.arrays import payload_bytes, record_bytes, to_fp16, to_fp32
from client.boundary import describe, is_decline, parse_reply_error
from common.errors import FedxrayError
from server.guards import ReplyGuards

log = logging.getLogger(__name__)
TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE


# Flower ErrorCodes whose reason is an exception's text (CLIENT_APP_RAISED_EXCEPTION, a Ray/vce exception):
# written by a ClientApp without our boundary, so its text may name files or patients and is not kept.
_RAW_EXCEPTION_CODES = (0, 2, 8)


def flower_error_text(code: int, reason: str | None) -> str:
    if int(code) in _RAW_EXCEPTION_CODES:
        return (f"Flower error {code}: the ClientApp failed outside fedxray's boundary (its text is withheld; "
                "the SuperNode's log has it)")
    return f"Flower error {code}: {str(reason or '')[:200]}"


def who(row: dict) -> str:
    """A round-history row's hospital: its site name, or its node id when it never said."""
    return row.get("site") or f"node {row['node_id']}"


class NotEnoughNodes(FedxrayError):
    """Fewer SuperNodes than the run needs connected within federation.node_wait_timeout."""


class GuardedGrid(Grid):
    def __init__(self, grid: Grid, *, min_nodes: int, wait_timeout: float, fp16: bool = False,
                 pull_interval: float = 0.5, clock=time.monotonic, guards: ReplyGuards | None = None):
        self._grid, self.min_nodes, self.wait_timeout, self.fp16 = grid, min_nodes, wait_timeout, fp16
        self.guards = guards if guards is not None else ReplyGuards()   # server/guards.py, on by default
        self.pull_interval = pull_interval
        self._clock = clock
        self._short_since: float | None = None
        self.replies: list[dict] = []       # drained by the server after each round
        self.sites: dict[int, str] = {}     # node id -> site name, learnt from replies: names a lost node too
        self.bytes_down: list[tuple[int, str, int]] = []   # (node id, message type, bytes) per message sent, likewise

    # -- Grid API delegated to the real grid ---------------------------------------------------------------
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    # -- the guarded parts ---------------------------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids; raises NotEnoughNodes after waiting too long with too few of them."""
        ids = list(self._grid.get_node_ids())
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self.wait_timeout:
            raise NotEnoughNodes(
                f"only {len(ids)} of the {self.min_nodes} SuperNodes this run needs (federation.min_available_nodes) "
                f"connected within {self.wait_timeout:.0f} s (federation.node_wait_timeout): start the missing SuperNodes "
                f"(check their --superlink address and logs) or lower federation.min_available_nodes / federation.min_train_nodes")
        return ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.fp16:
            self._encode(messages)
        for m in messages:
            self.bytes_down.append((int(m.metadata.dst_node_id), m.metadata.message_type, _weight_bytes(m.content)))
        replies = self._exchange(messages, timeout)
        sent = {m.metadata.message_id: m for m in messages}   # ids are set by now (push or pull)
        problems = _problems(replies, sent, self.guards)
        for r in replies:
            problem = problems.get(id(r))
            if problem:
                log.warning("rejected the %s reply of node %s: %s", r.metadata.message_type,
                            r.metadata.src_node_id, problem)
            self._record(r, problem)
            if id(r) in self.guards.notes:
                self.replies[-1]["guard"] = self.guards.notes[id(r)]
        answered = {r.metadata.src_node_id for r in replies}
        silent = [m for m in messages if m.metadata.dst_node_id not in answered]
        for m in silent:
            self._record_silence(m, timeout)
        if silent:
            log.warning("%d of %d nodes (%s) did not reply within the round timeout (%s s); going on without them",
                        len(silent), len(messages), ", ".join(self._name(m.metadata.dst_node_id) for m in silent),
                        timeout)
        replies = [r for r in replies if id(r) not in problems]
        # A hospital whose DP budget is spent declines (client/privacy.py): recorded above, not a failure, so
        # not handed to the strategy (Flower's central-DP wrappers skip a whole round on any error reply).
        return [r for r in replies if not (r.has_error() and is_decline(r.error.reason))]

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Push, then pull until every reply is in or `timeout` has passed (Flower's loop, shorter sleep)."""
        pending = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        wait = 0.02
        while pending and (timeout is None or time.monotonic() < end):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(wait)
                wait = min(2 * wait, self.pull_interval)
        return replies

    def _encode(self, messages: list[Message]) -> None:
        """Messages share one RecordDict per round: convert each distinct content once."""
        done: dict[int, RecordDict] = {}
        for m in messages:
            content = m.content
            if "arrays" not in content.array_records:
                continue
            if id(content) not in done:
                new = RecordDict({k: v for k, v in content.items() if k != "arrays"})
                new["arrays"] = to_fp16(content["arrays"])
                done[id(content)] = new
            m.content = done[id(content)]

    def _name(self, node_id: int) -> str:
        return f"{self.sites[node_id]} (node {node_id})" if node_id in self.sites else f"node {node_id}"

    def _record_silence(self, instruction: Message, timeout: float | None) -> None:
        node_id = int(instruction.metadata.dst_node_id)
        self.replies.append({"node_id": node_id, "site": self.sites.get(node_id, ""),
                             "type": instruction.metadata.message_type, "ok": False,
                             "error": f"no reply within federation.round_timeout ({timeout} s)", "code": "no-reply"})

    def _record(self, reply: Message, problem: str | None = None) -> None:
        node_id = int(reply.metadata.src_node_id)
        row = {"node_id": node_id, "site": "", "type": reply.metadata.message_type,
               "ok": not reply.has_error() and not problem}
        readable = not reply.has_error() and reply.has_content()
        if reply.has_error():
            info = parse_reply_error(reply.error.reason)
            if info is not None:   # a fedxray hospital's fixed-vocabulary failure or refusal
                row.update(site=info["site"], error=describe(info), code=info["code"], failure=info)
            else:                  # Flower's own: its fixed texts are kept, an exception's text never is
                row.update(error=flower_error_text(reply.error.code, reply.error.reason), code="flower")
        if readable:
            content = reply.content
            node = content.config_records.get("node")
            row["site"] = str(node["site"]) if node is not None and "site" in node else ""
        if row["site"]:
            self.sites[node_id] = row["site"]
        else:
            row["site"] = self.sites.get(node_id, "")
        if problem:
            row["error"], row["code"] = f"{REJECTED}{problem}", "rejected"
        elif readable:
            metrics = next(iter(content.metric_records.values()), None)
            row["metrics"] = dict(metrics) if metrics is not None else {}
            row["bytes_up"] = _weight_bytes(content)
            if "arrays" in content.array_records:
                content["arrays"] = to_fp32(content["arrays"])
        self.replies.append(row)

    def drain(self) -> tuple[list[dict], list[tuple[int, str, int]]]:
        out = (self.replies, self.bytes_down)
        self.replies, self.bytes_down = [], []
        return out


def _weight_bytes(content: RecordDict) -> int:
    """The weights' bytes of a message: its "arrays" record (the Message-API strategies), or, for SecAgg+'s
    stage messages (weights as legacy parameters or masked vectors inside config records), all it carries."""
    return record_bytes(content["arrays"]) if "arrays" in content.array_records else payload_bytes(content)


# ------------------------------------------------------------------------------------------ reply checks
REJECTED = "rejected by the server: "
WEIGHT = "num-examples"


def _ours(instruction: Message | None) -> bool:
    """Flower's Message-API strategies send the global weights as "arrays" with train and evaluate; the legacy
    SecAgg+ workflow's stage messages (server/secagg.py) have their own shapes and are left to it."""
    return instruction is not None and "arrays" in instruction.content.array_records


def reply_problem(reply: Message, instruction: Message | None) -> str | None:
    """Why this reply cannot be aggregated, or None. Error replies pass (they are recorded as failures)."""
    if reply.has_error() or not _ours(instruction):
        return None
    if not reply.has_content():
        return "the reply has neither content nor an error"
    content = reply.content
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    n = metrics.get(WEIGHT)
    if isinstance(n, list) or n is None or not math.isfinite(float(n)) or float(n) <= 0:
        return f"{WEIGHT} must be one positive number, got {n!r}"
    if reply.metadata.message_type != TRAIN:
        return None
    expected = {k: (tuple(a.shape), np.dtype(a.dtype).kind) for k, a in instruction.content["arrays"].items()}
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord of weights, got {len(content.array_records)}"
    arrays = next(iter(content.array_records.values()))
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"weights do not match the global model: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, (shape, kind) in expected.items():
        try:
            value = arrays[key].numpy()
        except Exception as e:  # noqa: BLE001 - undecodable bytes from the wire
            return f"weight {key!r} cannot be decoded ({type(e).__name__}: {e})"
        if tuple(value.shape) != shape:
            return f"weight {key!r} has shape {tuple(value.shape)}, the global model's is {shape}"
        if value.dtype.kind != kind:
            return f"weight {key!r} is {value.dtype}, the global model's is of kind {kind!r}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"weight {key!r} holds NaN/inf (the hospital's training diverged)"
    return None


def _problems(replies: list[Message], sent: dict[str, Message], guards: ReplyGuards | None = None
              ) -> dict[int, str]:
    """{id(reply): why} for the replies to keep from the strategy; also those whose metric names differ from
    the most common set of their message type (Flower needs one set to average), and then those the guards
    against a hostile hospital exclude (server/guards.py; they also cap num-examples in place)."""
    out = {id(r): p for r in replies
           if (p := reply_problem(r, sent.get(r.metadata.reply_to_message_id))) is not None}
    for kind in (TRAIN, EVALUATE):
        good = [r for r in replies if id(r) not in out and not r.has_error() and r.metadata.message_type == kind
                and _ours(sent.get(r.metadata.reply_to_message_id))]
        names = {id(r): tuple(sorted(next(iter(r.content.metric_records.values())).keys())) for r in good}
        if len(set(names.values())) > 1:
            usual = Counter(names.values()).most_common(1)[0][0]
            out.update({i: f"its metrics {list(n)} differ from the other hospitals' {list(usual)}"
                        for i, n in names.items() if n != usual})
    if guards is not None:
        out.update(guards.check([r for r in replies if id(r) not in out and not r.has_error()
                                 and _ours(sent.get(r.metadata.reply_to_message_id))], sent))
    return out
