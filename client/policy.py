"""The hospital's site policy: rules only the hospital controls, checked before its node trains for anyone.

Flower leaves this to the app. NVIDIA FLARE has site-side privacy filters; this is the same idea for a Flower
ClientApp. The SuperNode operator points the node at a TOML file (`--node-config "site-policy='/etc/fedxray/
policy.toml'"`); the run config, which the coordinator writes, can ask but never override. A run that asks for
less than the policy demands is refused with the rule and the numbers involved (client/boundary.py: code
`policy-refused`), which the server records and shows. An unreadable or invalid policy refuses every run
(fails closed), with the detail in the hospital's own log.

    [privacy]
    require-dp = true              # client-side DP-SGD (Opacus) on every run
    max-epsilon-per-run = 8.0      # a run's target epsilon (or, with a fixed sigma, its projected epsilon)
    max-epsilon-total = 20.0       # over every run this hospital ever trained in: the ledger on its own disk
    max-delta = 1e-5
    min-noise-multiplier = 0.5
    max-clipping-norm = 1.0
    ledger = "privacy-ledger.json" # relative to this file's folder
    [training]
    min-train-examples = 50        # smaller local training sets leak more per update
    [aggregation]
    require-secure-aggregation = false   # Flower's SecAgg+: the server only ever sees the sum
    [disclosure]
    metrics = ["num-examples", "train-loss", "val-auc"]   # metrics that may leave; others are sent as NaN
    min-count = 5                  # data statistics (job=stats): any count below this leaves as "<5", 0 included

The ledger composes every run's DP-SGD history (noise multiplier, sample rate, steps) with Opacus' RDP
accountant: RDP composes across runs exactly as across rounds, so the total is an (epsilon, delta) guarantee
for the hospital's patients over all runs, at the policy's max-delta. It is written atomically, owner-only,
under a file lock, after each round's training and before the update leaves the hospital: a crash can only
over-count. Each round's entry also records the Flower run and the run settings' fingerprint.
"""
from __future__ import annotations

import fcntl
import json
import math
import tomllib
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import FedxrayError
from common.fileio import write_json

POLICY_KEY = "site-policy"              # node config key naming the policy file
BUDGET_TOLERANCE = 1.02                 # as client/privacy.py: get_noise_multiplier lands within 2 % of a target
ALWAYS_SHARED = ("num-examples",)       # the aggregation weight; FedAvg cannot work without it


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=lambda s: s.replace("_", "-"), populate_by_name=True,
                              frozen=True)


class PrivacyRules(_Section):
    require_dp: bool = False
    max_epsilon_per_run: float | None = Field(None, gt=0)
    max_epsilon_total: float | None = Field(None, gt=0)
    max_delta: float = Field(1e-5, gt=0, lt=1)
    min_noise_multiplier: float = Field(0.0, ge=0)
    max_clipping_norm: float | None = Field(None, gt=0)
    ledger: str = "privacy-ledger.json"


class TrainingRules(_Section):
    min_train_examples: int = Field(0, ge=0)


class AggregationRules(_Section):
    require_secure_aggregation: bool = False


DEFAULT_MIN_COUNT = 5


class DisclosureRules(_Section):
    """What may leave besides model updates. `min_count` is the small-cell suppression threshold of the data
    statistics (client/stats.py). DEFAULT_MIN_COUNT = 5 when a hospital sets none: the threshold most health
    statistics publishers use for small cells (counts of 1-4 patients can single a person out when combined
    with what else is known); a hospital under a stricter rule (10, 11) sets its own."""

    metrics: list[str] | None = None    # None: every metric fedxray computes may leave
    min_count: int = Field(DEFAULT_MIN_COUNT, ge=1)


class SitePolicy(_Section):
    privacy: PrivacyRules = PrivacyRules()
    training: TrainingRules = TrainingRules()
    aggregation: AggregationRules = AggregationRules()
    disclosure: DisclosureRules = DisclosureRules()
    path: Path | None = Field(None, exclude=True)

    @property
    def epsilon_limited(self) -> bool:
        """An epsilon limit only means something if every training run is private."""
        p = self.privacy
        return p.require_dp or p.max_epsilon_per_run is not None or p.max_epsilon_total is not None

    @classmethod
    def for_node(cls, node_config: dict) -> "SitePolicy | None":
        """The node's policy, or None when its node config names none. Raises FedxrayError(code=site-policy)."""
        name = str(node_config.get(POLICY_KEY) or "")
        if not name:
            return None
        path = Path(name).expanduser()
        try:
            raw = tomllib.loads(path.read_text())
            return cls.model_validate({**raw, "path": path.resolve()})
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as e:
            raise FedxrayError(f"site policy {path}: {e}", failure="site-policy") from e

    def ledger(self) -> "PrivacyLedger":
        where = Path(self.privacy.ledger)
        return PrivacyLedger(where if where.is_absolute() else self.path.parent / where, self.privacy.max_delta)

    @staticmethod
    def min_count_of(policy: "SitePolicy | None") -> int:
        """The node's small-count threshold: its policy's `[disclosure] min-count`, else DEFAULT_MIN_COUNT."""
        return policy.disclosure.min_count if policy is not None else DEFAULT_MIN_COUNT

    def shares(self, metric: str) -> bool:
        allowed = self.disclosure.metrics
        return allowed is None or metric in allowed or metric in ALWAYS_SHARED


class Refusal(Exception):
    """A rule of the site policy that this run breaks: its name and the numbers involved (nothing else)."""

    def __init__(self, rule: str, asked: float | bool | None = None, limit: float | bool | None = None):
        super().__init__(rule)
        self.rule, self.asked, self.limit = rule, asked, limit

    def detail(self) -> dict:
        return {"rule": self.rule, "asked": self.asked, "limit": self.limit}


def check_run(policy: SitePolicy, s, *, train_examples: int, secure_aggregation: bool, budget=None) -> None:
    """Raise Refusal for the first rule the run (Settings `s`) breaks. `budget`: the PrivacyBudget this
    hospital would train with (DP runs), for its delta and noise multiplier."""
    p = policy.privacy
    if policy.epsilon_limited and not s.privacy.enabled:
        raise Refusal("require-dp", False, True)
    if train_examples < policy.training.min_train_examples:
        raise Refusal("min-train-examples", train_examples, policy.training.min_train_examples)
    if policy.aggregation.require_secure_aggregation and not secure_aggregation:
        raise Refusal("require-secure-aggregation", False, True)
    if not s.privacy.enabled or budget is None:
        return
    if budget.delta > p.max_delta:
        raise Refusal("max-delta", budget.delta, p.max_delta)
    if budget.noise_multiplier < p.min_noise_multiplier:
        raise Refusal("min-noise-multiplier", budget.noise_multiplier, p.min_noise_multiplier)
    if p.max_clipping_norm is not None and s.privacy.max_grad_norm > p.max_clipping_norm:
        raise Refusal("max-clipping-norm", s.privacy.max_grad_norm, p.max_clipping_norm)
    if p.max_epsilon_per_run is not None:
        planned = budget.cfg.target_epsilon if budget.cfg.noise_multiplier is None else budget.epsilon(
            budget.planned_steps)
        if planned is not None and planned > p.max_epsilon_per_run * BUDGET_TOLERANCE:
            raise Refusal("max-epsilon-per-run", round(float(planned), 4), p.max_epsilon_per_run)


def check_round(policy: SitePolicy, ledger: "PrivacyLedger", rp) -> None:
    """Raise Refusal when the next round (RoundPrivacy `rp`) would break the per-run or the total epsilon."""
    p = policy.privacy
    run_eps = rp.budget.epsilon(rp.round_steps)
    if p.max_epsilon_per_run is not None and run_eps > p.max_epsilon_per_run * BUDGET_TOLERANCE:
        raise Refusal("max-epsilon-per-run", round(run_eps, 4), p.max_epsilon_per_run)
    if p.max_epsilon_total is not None:
        total = ledger.total_epsilon([(rp.budget.noise_multiplier, rp.budget.sample_rate, rp.round_steps)])
        if total > p.max_epsilon_total * BUDGET_TOLERANCE:
            raise Refusal("max-epsilon-total", round(total, 4), p.max_epsilon_total)


# ------------------------------------------------------------------------------------------ the ledger
Step = tuple[float, float, int]   # (noise multiplier, sample rate, steps): an Opacus accountant history entry


def _epsilon(history: list[Step], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """Every DP-SGD round this hospital trained, on its own disk (see the module docstring)."""

    def __init__(self, path: Path, delta: float):
        self.path, self.delta = Path(path), delta

    def _read(self) -> dict:
        if not self.path.is_file():
            return {"version": 1, "delta": self.delta, "runs": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:   # never guess a spent budget: refuse until a person looks
            raise FedxrayError(f"privacy ledger {self.path} is unreadable ({e}); restore it from backup",
                               failure="site-policy") from e
        return data

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def runs(self) -> dict[str, dict]:
        with self._locked():
            return self._read()["runs"]

    @staticmethod
    def _history(run: dict) -> list[Step]:
        return [(float(a), float(b), int(c)) for a, b, c in run.get("history", [])]

    def run_history(self, run_key: str, fingerprint: str, resumed: bool) -> list[Step] | None:
        """The DP history of this logical run: its own entries and, when it resumes an earlier run (a resumed
        run is a new Flower run), those of earlier runs with the same settings. None when nothing is recorded."""
        runs = self.runs()
        keys = [k for k, r in runs.items() if k == run_key or (resumed and r.get("fingerprint") == fingerprint)]
        if not keys:
            return None
        return [h for k in keys for h in self._history(runs[k])]

    def total_epsilon(self, extra: list[Step] = ()) -> float:
        """Epsilon at the ledger's delta over every recorded run (plus `extra` steps not yet taken)."""
        runs = self.runs()
        return _epsilon([h for r in runs.values() for h in self._history(r)] + list(extra), self.delta)

    def record(self, run_key: str, *, fingerprint: str, site: str, server_round: int, steps: list[Step],
               run_epsilon: float, run_delta: float) -> float:
        """Add one round's DP steps; returns the new total epsilon. Called before the update leaves."""
        with self._locked():
            data = self._read()
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            run = data["runs"].setdefault(run_key, {"fingerprint": fingerprint, "site": site, "started": now,
                                                    "rounds": [], "history": []})
            run["rounds"].append(int(server_round))
            run["history"].extend([float(a), float(b), int(c)] for a, b, c in steps)
            run.update(updated=now, epsilon=float(run_epsilon), delta=float(run_delta))
            total = _epsilon([h for r in data["runs"].values() for h in self._history(r)], self.delta)
            data.update(delta=self.delta, total_epsilon=total, updated=now)
            write_json(self.path, data)
        return total if math.isfinite(total) else float("inf")
