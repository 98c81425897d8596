"""Client-side differential privacy: Opacus DP-SGD with an accountant that survives between rounds.

A Flower ClientApp may run each round in a fresh process, so the accountant's history (noise multiplier,
sample rate, steps) is carried as plain numbers in the node's Context state, never as a pickled object.
Before a round the client projects the epsilon it would have spent afterwards and declines to train if that
breaks its budget. Sampling is Opacus' Poisson sampling with Opacus' own rate, 1 / len(loader): the loader is
built with drop_last, so one epoch is floor(n / batch) steps at rate 1 / floor(n / batch), exactly what the
noise is calibrated for. An empty Poisson batch (probability about exp(-batch_size), negligible at batch 16+)
is skipped without an optimiser step; the accountant still counts it, so the reported epsilon is an upper bound.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.nn as nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.settings import PrivacyConfig

BUDGET_TOLERANCE = 1.02  # projected epsilon may exceed the target by 2 % (get_noise_multiplier's tolerance)


@dataclass
class PrivacyBudget:
    cfg: PrivacyConfig
    num_examples: int
    batch_size: int
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self):
        self.sample_rate = 1.0 / self.steps_per_epoch(self.num_examples, self.batch_size)  # Opacus' own rate
        self.delta = self.cfg.delta or 1.0 / (10 * max(self.num_examples, 1))
        from opacus.accountants.utils import get_noise_multiplier  # opacus imports are slow: only when used

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
        """Steps of one epoch = len() of a drop_last loader; Opacus then samples at rate 1 / this."""
        return max(1, num_examples // max(batch_size, 1))

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far (plus `extra_steps` more at the current noise), at this budget's delta."""
        hist = list(self.history)
        if extra_steps:
            hist.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not hist:
            return 0.0
        from opacus.accountants import create_accountant

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
        """Wrap model/optimizer/loader for DP-SGD; returns (engine, model, optimizer, loader), and with a
        `criterion` (engine, model, optimizer, loader, criterion): ghost clipping wraps the loss, the other modes
        hand it back as it was."""
        if len(loader) != self.steps_per_epoch(self.num_examples, self.batch_size):
            raise ValueError(f"loader has {len(loader)} batches, the budget planned "
                             f"{self.steps_per_epoch(self.num_examples, self.batch_size)}: build it with "
                             f"drop_last=True over the {self.num_examples} examples the budget was made for")
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=self.cfg.accountant, secure_mode=False)
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                      max_grad_norm=self.cfg.max_grad_norm, grad_sample_mode=self.cfg.grad_sample_mode,
                      poisson_sampling=True)
        if self.cfg.grad_sample_mode == "ghost":
            if criterion is None:
                raise ValueError("privacy.grad_sample_mode=ghost clips per-sample losses: pass the criterion to "
                                 "attach(), which returns it wrapped")
            kwargs["criterion"] = criterion
            _use_conv_ghost_norms()
        if self.cfg.secure_rng:
            kwargs["noise_generator"] = engine.secure_rng = secret_generator()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = engine.make_private(**kwargs)
        if self.cfg.secure_rng:
            wrapped[1].secure_mode = True   # Opacus' noise robust to floating-point attacks (sum of 4 draws / 2)
        if criterion is None:
            return (engine, *wrapped)
        if self.cfg.grad_sample_mode == "ghost":   # Opacus returns (module, optimizer, criterion, loader)
            m, o, c, dl = wrapped
            return engine, m, o, dl, c
        return (engine, *wrapped, criterion)

    def record(self, engine) -> float:
        """Add the steps this round took to the carried history; returns epsilon spent so far."""
        self.history.extend(tuple(h) for h in engine.accountant.history)
        return self.epsilon()

    def state(self) -> dict:
        """Plain numbers for Flower's ConfigRecord (lists of floats/ints)."""
        return {"dp-noise": [h[0] for h in self.history], "dp-rate": [h[1] for h in self.history],
                "dp-steps": [int(h[2]) for h in self.history]}

    def load_state(self, state: dict) -> None:
        self.history = list(zip(state.get("dp-noise", []), state.get("dp-rate", []), state.get("dp-steps", [])))


def conv2d_norm_sample(layer: nn.Conv2d, activations: list, backprops) -> dict:
    """Per-sample gradient norms of a Conv2d for Opacus' ghost clipping, without per-sample gradients.

    Opacus 1.6 has norm samplers for Linear and Embedding only, so ghost clipping materialised every conv's
    per-sample gradients (B x its weights: 1.4 GB per batch of 32 for ResNet-18) and was slower than hooks. A
    convolution is a linear layer over unfolded patches: with A (T x d) the patches of one sample and G (T x p)
    its output gradients, the weight gradient is G^T A and ||G^T A||^2 = <A A^T, G G^T> (the ghost norm, T^2
    (d + p) work); when T^2 exceeds d p the gradient itself is cheaper and is formed instead. Grouped,
    non-zero-padded or non-2d cases use Opacus' own per-sample gradient."""
    import torch
    import torch.nn.functional as F

    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        from opacus.grad_sample.conv import compute_conv_grad_sample

        return {p: g.reshape(n, -1).norm(2, dim=1) for p, g in compute_conv_grad_sample(layer, activations,
                                                                                         backprops).items()}
    a = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    a = a.transpose(1, 2)                          # (n, T, d)
    g = backprops.reshape(n, backprops.shape[1], -1).transpose(1, 2)   # (n, T, p)
    t, d, p = a.shape[1], a.shape[2], g.shape[2]
    out = {}
    if layer.weight.requires_grad:
        if t * t <= d * p:
            sq = torch.einsum("nij,nij->n", torch.bmm(g, g.transpose(1, 2)), torch.bmm(a, a.transpose(1, 2)))
        else:
            sq = torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))
        out[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1).norm(2, dim=1)
    return out


def _use_conv_ghost_norms() -> None:
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    GradSampleHooksFastGradientClipping.NORM_SAMPLERS.setdefault(nn.Conv2d, conv2d_norm_sample)


def secret_generator():
    """A torch Generator seeded from the OS CSPRNG, for Opacus' noise and Poisson sampling.

    Opacus' own secure_mode needs torchcsprng, which is unmaintained and has no wheels for current torch. What
    secure_mode protects against is (1) an adversary who knows the seed, and so which examples each Poisson
    batch held and the noise drawn (the run's `seed` is in the run config, which the server writes), and (2)
    floating-point attacks on the Gaussian sampler. This generator closes (1): its seed is 63 bits from
    `secrets`, never stored. (2) is Opacus' secure noise, switched on for the optimizer in `attach`. What
    remains is that torch's Mersenne Twister is not a CSPRNG: its state could in principle be reconstructed
    from many observed raw outputs, which DP-SGD never releases (only noised sums)."""
    import secrets

    import torch

    return torch.Generator().manual_seed(secrets.randbits(63))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus' GradSampleModule (its state_dict keys carry no `_module.` prefix)."""
    return getattr(model, "_module", model)


def dp_trainable(cfg: PrivacyConfig, pretrained: bool) -> str:
    """The part of the network DP-SGD trains (common.models.DP_TRAINABLE) for privacy.trainable.

    auto: a pretrained model (model.weights = imagenet or a file: a non-private warm start) trains only its
    normalisation layers and head privately: per-sample gradients of a few thousand GroupNorm parameters cost
    next to nothing, so a DP step measured 0.4-0.7x a full non-DP step, while the last block + head (8.4 M of
    ResNet-18's 11 M parameters) measured 10-15x and every layer 11-17x (benchmarks/sections/privacy.py). A
    model from scratch has nothing worth keeping frozen, so it trains every layer.
    Freezing changes no accounting: the frozen weights are the ones the model started from (public, or the
    global model every hospital received), and Opacus clips and noises the gradient of every parameter that
    changes; the accountant counts steps and sampling, which freezing leaves as they were."""
    if cfg.trainable != "auto":
        return cfg.trainable
    return "norm+head" if pretrained else "all"


def is_pretrained(weights: str) -> bool:
    """model.weights names a starting point (imagenet or a file) rather than random initialisation."""
    return weights.strip().lower() not in ("", "none")


# ------------------------------------------------------------------------------------------ one Flower round
DP_STATE = "fedxray-dp"                        # Context.state ConfigRecord with the accountant history


@dataclass
class RoundPrivacy:
    """DP-SGD for one training round of a hospital: budget from Context.state, decline before over-spending.

    Planned steps = federation.rounds x federation.local_epochs x floor(n / batch). If the Context state is empty in a
    round > 1 (a resumed run is a new Flower run with a fresh Context), the earlier rounds are assumed to have
    spent what they were planned to spend (same settings: the checkpoint's fingerprint guarantees it), so a
    resume never restarts the accounting at zero.
    """

    budget: PrivacyBudget
    round_steps: int
    assumed_rounds: int = 0
    new_steps: list = field(default_factory=list)   # this round's accountant history, once finished

    @classmethod
    def start(cls, s, state, num_examples: int, global_round: int, history: list | None = None) -> "RoundPrivacy":
        """`history`: what the hospital's privacy ledger (client/policy.py) recorded for this run; it wins over
        the Context state, which a restarted SuperNode loses."""
        round_steps = PrivacyBudget.steps_per_epoch(num_examples, s.train.batch_size) * s.federation.local_epochs
        budget = PrivacyBudget(s.privacy, num_examples, s.train.batch_size, s.federation.rounds * round_steps)
        assumed = 0
        if history is not None:
            budget.history = list(history)
        elif DP_STATE in state.config_records:
            budget.load_state(dict(state.config_records[DP_STATE]))
        elif global_round > 1:
            assumed = global_round - 1
            budget.history = [(budget.noise_multiplier, budget.sample_rate, assumed * round_steps)]
        return cls(budget, round_steps, assumed)

    def allowed(self) -> bool:
        return self.budget.allows(self.round_steps)

    def finish(self, engine, state) -> dict:
        """Record this round's steps in the carried history; the reply's privacy metrics."""
        from flwr.app import ConfigRecord

        self.new_steps = [tuple(h) for h in engine.accountant.history]
        eps = self.budget.record(engine)
        state.config_records[DP_STATE] = ConfigRecord(self.budget.state())
        return self.metrics(eps)

    def metrics(self, epsilon: float | None = None) -> dict:
        return {"dp-epsilon": float(self.budget.epsilon() if epsilon is None else epsilon),
                "dp-delta": float(self.budget.delta), "dp-noise-multiplier": float(self.budget.noise_multiplier),
                "dp-assumed-rounds": self.assumed_rounds}

    def decline(self, site: str):
        """The Error reply of a hospital that will not train: Flower's FedAvg family drops error replies and
        aggregates the others; the server recognises this one (client.boundary.is_decline) and records it."""
        from flwr.app import Error

        from client.boundary import REFUSED, reason

        info = {**self.metrics(), "projected-epsilon": self.budget.epsilon(self.round_steps),
                "target-epsilon": self.budget.cfg.target_epsilon}
        return Error(REFUSED, reason("dp-budget-spent", site=site, detail=info))
