"""Client-side differential privacy: Opacus DP-SGD with an accountant that survives between rounds.

A Flower ClientApp may run each round in a fresh process, so the accountant's history (noise multiplier,
sample rate, steps) is carried as plain numbers in the node's Context state, never as a pickled object.
Before a round the client projects the epsilon it would have spent afterwards and declines to train if that
breaks its budget. Sampling is Opacus' Poisson sampling; an empty Poisson batch (probability about
exp(-batch_size), negligible at batch 16+) is skipped without a step, which the accountant does not count.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch.nn as nn
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.config import PrivacyConfig

BUDGET_TOLERANCE = 1.02  # projected epsilon may exceed the target by 2 % (get_noise_multiplier's tolerance)


@dataclass
class PrivacyBudget:
    cfg: PrivacyConfig
    num_examples: int
    batch_size: int
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self):
        self.sample_rate = min(1.0, self.batch_size / max(self.num_examples, 1))
        self.delta = self.cfg.delta or 1.0 / (10 * max(self.num_examples, 1))
        if self.cfg.noise_multiplier is not None:
            self.noise_multiplier = self.cfg.noise_multiplier
        elif self.cfg.target_epsilon is not None:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.cfg.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                steps=max(self.planned_steps, 1), accountant=self.cfg.accountant)
        else:
            raise ValueError("privacy needs target_epsilon or noise_multiplier")

    @staticmethod
    def steps_per_epoch(num_examples: int, batch_size: int) -> int:
        return max(1, math.ceil(num_examples / batch_size))

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far (plus `extra_steps` more at the current noise), at this budget's delta."""
        hist = list(self.history)
        if extra_steps:
            hist.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not hist:
            return 0.0
        acc = create_accountant(self.cfg.accountant)
        acc.history = [tuple(h) for h in hist]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta=self.delta))

    def allows(self, steps: int) -> bool:
        """True when training `steps` more keeps epsilon within the target (always True for a fixed sigma)."""
        if self.cfg.target_epsilon is None or self.cfg.noise_multiplier is not None:
            return True
        return self.epsilon(steps) <= self.cfg.target_epsilon * BUDGET_TOLERANCE

    def attach(self, model: nn.Module, optimizer: Optimizer, loader: DataLoader, criterion=None):
        """Wrap model/optimizer/loader for DP-SGD; returns (engine, model, optimizer, loader[, criterion])."""
        engine = PrivacyEngine(accountant=self.cfg.accountant, secure_mode=False)
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                      max_grad_norm=self.cfg.max_grad_norm, grad_sample_mode=self.cfg.grad_sample_mode,
                      poisson_sampling=True)
        if self.cfg.grad_sample_mode == "ghost":
            kwargs["criterion"] = criterion
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = engine.make_private(**kwargs)
        return (engine, *wrapped)

    def record(self, engine: PrivacyEngine) -> float:
        """Add the steps this round took to the carried history; returns epsilon spent so far."""
        self.history.extend(tuple(h) for h in engine.accountant.history)
        return self.epsilon()

    def state(self) -> dict:
        """Plain numbers for Flower's ConfigRecord (lists of floats/ints)."""
        return {"dp-noise": [h[0] for h in self.history], "dp-rate": [h[1] for h in self.history],
                "dp-steps": [int(h[2]) for h in self.history]}

    def load_state(self, state: dict) -> None:
        self.history = list(zip(state.get("dp-noise", []), state.get("dp-rate", []), state.get("dp-steps", [])))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus' GradSampleModule (its state_dict keys carry no `_module.` prefix)."""
    return getattr(model, "_module", model)
