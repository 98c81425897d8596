"""Guards against a hostile (or broken) hospital: what one reply may claim, and how far it may move the model.

Flower's strategies take every reply at its word: weights scaled x1000 pass the reply gate (server/grid.py)
and dominate FedAvg's mean, and `num-examples = 1e9` makes one hospital's weights the global model. These
guards run in GuardedGrid's per-round check, after the reply gate and before any strategy aggregates, so they
protect every strategy alike. Each is a run-config key (Settings, `guard-*`); all but the direction check
are on by default:

* num-examples is bounded (`cap_claims`), for train and evaluate replies. A claim is capped at
  `guards.examples_growth` x what the hospital claimed in its first accepted round (its registered count: a
  hospital's data does not grow during a run; a server restart registers afresh), and at
  `guards.examples_ratio` x the median of the OTHER hospitals' claims in that round. Capped, not rejected: the
  update still counts with a bounded weight; the cap is logged and recorded in the round's history. The
  relative cap needs 2 replies (with 2, each is bounded by the other's claim); a lone reply only meets its
  registered cap.
* An update whose size ||w_i - w_global|| is above `guards.norm_ratio` x the round's median is excluded (scaled
  or boosted weights), and so is one whose cosine to the coordinate-wise median of the round's updates is
  below `guards.min_cosine` (a sign-flipped update points away from it). Both need at least 3 train replies:
  a median of 2 is their mean, and of two disagreeing hospitals neither is "the outlier". With 1 or 2 they are
  skipped, and a warning says so once per run. Both assume most hospitals in a round are honest.
  The direction check is off by default (-1): with labels skewed across hospitals (Dirichlet alpha 0.3 on
  PneumoniaMNIST, 5 hospitals) an honest hospital holding most of the minority class measured cosines down to
  -0.43 round after round, so any threshold that catches a sign flip (about -0.6 to -0.9) would sometimes
  exclude exactly the hospital the others need. Turn it on (e.g. 0) where hospitals agree in direction
  (the synthetic hospitals of benchmarks/byzantine.py measured 0.66 and above).

Norms and directions are over every floating-point array, BatchNorm running statistics included (a hostile
running_var breaks the model as surely as a hostile weight); integer buffers do not count. Arithmetic is in
float64, chunk by chunk, so memory stays at n_replies x CHUNK values whatever the model.

Not covered: SecAgg+ rounds (the server only sees the sum; secagg.max_weight and secagg.clipping_range bound
each hospital there), and poisoning that stays within the bounds (a hospital training on wrong labels sends
an update of ordinary size): combine with fedmedian / fedtrimmedavg / krum for that.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MessageType

from common.settings import GuardConfig

log = logging.getLogger(__name__)
TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE
WEIGHT = "num-examples"
MIN_REPLIES = 3          # for a median of the round's updates to say which one is the outlier
CHUNK = 1 << 18          # values per array slice in update_scores


DEFAULTS = GuardConfig()
OFF = GuardConfig(examples_ratio=0, examples_growth=0, norm_ratio=0, min_cosine=-1)


@dataclass(frozen=True)
class UpdateScore:
    """How one train reply moved the model, relative to the round's other replies."""

    norm: float                  # ||w_i - w_global|| over the floating-point arrays
    norm_ratio: float | None     # norm / the round's median norm; None below MIN_REPLIES or with a zero median
    cosine: float | None         # to the coordinate-wise median update; None below MIN_REPLIES or for a zero update

    def row(self) -> dict:
        """For the round's history (JSON: no NaN)."""
        return {"update-norm": round(self.norm, 6),
                **({"update-norm-ratio": round(self.norm_ratio, 4)} if self.norm_ratio is not None else {}),
                **({"update-cosine": round(self.cosine, 4)} if self.cosine is not None else {})}


def update_scores(updates: Sequence[Mapping[str, np.ndarray]], sent: Mapping[str, np.ndarray]) -> list[UpdateScore]:
    """Size and direction of each update w_i - w_global (`sent`: the global arrays of the round)."""
    n = len(updates)
    keys = [k for k, g in sent.items() if np.asarray(g).dtype.kind == "f"]
    sq, dots, median_sq = np.zeros(n), np.zeros(n), 0.0
    for k in keys:
        g = np.asarray(sent[k], np.float64).ravel()
        flat = [np.asarray(u[k]).ravel() for u in updates]
        for lo in range(0, g.size, CHUNK):
            d = np.stack([f[lo:lo + CHUNK].astype(np.float64) for f in flat]) - g[lo:lo + CHUNK]
            sq += np.einsum("ij,ij->i", d, d)
            if n >= MIN_REPLIES:
                m = np.median(d, axis=0)
                dots += d @ m
                median_sq += float(m @ m)
    norms = np.sqrt(sq)
    if n < MIN_REPLIES:
        return [UpdateScore(float(x), None, None) for x in norms]
    median_norm = float(np.median(norms))
    scores = []
    for i in range(n):
        ratio = float(norms[i] / median_norm) if median_norm > 0 else None
        cos = float(dots[i] / (norms[i] * math.sqrt(median_sq))) if norms[i] > 0 and median_sq > 0 else None
        scores.append(UpdateScore(float(norms[i]), ratio, cos))
    return scores


def update_outliers(scores: Sequence[UpdateScore], settings: GuardConfig) -> list[str | None]:
    """Why each update is excluded, or None."""
    out: list[str | None] = []
    for s in scores:
        why = None
        if settings.norm_ratio > 0 and s.norm_ratio is not None and s.norm_ratio > settings.norm_ratio:
            why = (f"its update is {s.norm_ratio:.3g} x the round's median size (||w - w_global|| = {s.norm:.3g}; "
                   f"guards.norm_ratio={settings.norm_ratio:g})")
        elif settings.min_cosine > -1 and s.cosine is not None and s.cosine < settings.min_cosine:
            why = (f"its update points away from the other hospitals' (cosine {s.cosine:.2f} to the coordinate-wise "
                   f"median update; guards.min_cosine={settings.min_cosine:g})")
        out.append(why)
    return out


def cap_claims(claims: Sequence[float], registered: Sequence[float | None], settings: GuardConfig
               ) -> list[tuple[float, str | None]]:
    """(the num-examples to aggregate with, why it was capped or None) for each claim of one round;
    `registered[i]`: what that hospital claimed in its first accepted round (None: this is its first)."""
    out: list[tuple[float, str | None]] = []
    for i, claim in enumerate(claims):
        limits: list[tuple[float, str]] = []
        if settings.examples_growth > 0 and registered[i] is not None:
            limits.append((settings.examples_growth * registered[i],
                           f"{settings.examples_growth:g} x its first accepted claim {registered[i]:g} "
                           "(guards.examples_growth)"))
        others = [c for j, c in enumerate(claims) if j != i]
        if settings.examples_ratio > 0 and others:
            median = float(np.median(others))
            limits.append((settings.examples_ratio * median,
                           f"{settings.examples_ratio:g} x the median {median:g} of the other hospitals' claims "
                           "(guards.examples_ratio)"))
        bound, why = min(limits, default=(math.inf, ""), key=lambda x: x[0])
        if claim > bound:
            capped = max(1, math.floor(bound))
            out.append((capped, f"{WEIGHT} {claim:g} capped to {capped}: {why}"))
        else:
            out.append((claim, None))
    return out


class ReplyGuards:
    """The guards of one run: the registered counts per node, and the per-round check GuardedGrid calls."""

    def __init__(self, settings: GuardConfig = DEFAULTS):
        self.settings = settings
        self.registered: dict[tuple[str, int], float] = {}   # (message type, node id) -> first accepted claim
        self.notes: dict[int, dict] = {}                      # id(reply) -> findings, for the round's history
        self._warned_few = False

    def check(self, replies: Sequence[Message], sent: Mapping[str, Message]) -> dict[int, str]:
        """{id(reply): why} for the train replies to exclude; caps num-examples in the replies themselves.
        `replies`: those that passed the reply gate (weights and metrics well-formed); `sent`: the
        instructions by message id (their "arrays" are the global model of the round)."""
        self.notes = {}
        out: dict[int, str] = {}
        train = [r for r in replies if r.metadata.message_type == TRAIN]
        if train and self.settings.updates_checked:
            out.update(self._check_updates(train, sent))
        for kind in (TRAIN, EVALUATE):
            self._cap([r for r in replies if r.metadata.message_type == kind and id(r) not in out], kind)
        return out

    def _check_updates(self, train: list[Message], sent: Mapping[str, Message]) -> dict[int, str]:
        if len(train) < MIN_REPLIES and not self._warned_few:
            self._warned_few = True
            log.warning("only %d train replies this round: the update-size and direction guards need %d and are "
                        "skipped while there are fewer (num-examples stays bounded)", len(train), MIN_REPLIES)
        glob = sent[train[0].metadata.reply_to_message_id].content["arrays"]   # one global model per round
        scores = update_scores([_arrays(r) for r in train], {k: a.numpy() for k, a in glob.items()})
        out = {}
        for r, score, why in zip(train, scores, update_outliers(scores, self.settings), strict=True):
            self.notes[id(r)] = score.row()
            if why:
                out[id(r)] = why
        return out

    def _cap(self, replies: list[Message], kind: str) -> None:
        keys = [(kind, int(r.metadata.src_node_id)) for r in replies]
        metrics = [next(iter(r.content.metric_records.values())) for r in replies]
        claims = [float(m[WEIGHT]) for m in metrics]
        capped = cap_claims(claims, [self.registered.get(k) for k in keys], self.settings)
        for r, key, m, claim, (value, why) in zip(replies, keys, metrics, claims, capped, strict=True):
            if why:
                log.warning("capped the %s reply of node %s: %s", kind, key[1], why)
                m[WEIGHT] = int(value)
                self.notes.setdefault(id(r), {})["capped"] = why
            self.registered.setdefault(key, claim)   # what it claimed, even if that was capped


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in next(iter(reply.content.array_records.values())).items()}
