"""Arm types by kind. An arm type is pluggable: register a class with `kind`, `expand`, `unavailable`, `run`.

Importing this package registers the built-in kinds: centralised, local, federated, dp, warm-start.
"""
from simulations.arms import centralised, federated, local, warm_start  # noqa: F401  (registration)
from simulations.arms.base import ARM_TYPES, ArmContext, ArmType, register

__all__ = ["ARM_TYPES", "ArmContext", "ArmType", "register"]
