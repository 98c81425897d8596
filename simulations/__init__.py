"""Simulations: centralised vs federated (Flower simulation runtime) vs local-only on identical splits and
seeds, with a report a researcher can publish from. `run_experiment(load_simulation(path))` or
`fedxray simulate [EXPERIMENT]`.
"""
from simulations.config import SimulationConfig, load_simulation


def run_experiment(cfg: SimulationConfig, **kwargs) -> dict:
    from simulations.runner import run_experiment as _run

    return _run(cfg, **kwargs)


__all__ = ["SimulationConfig", "load_simulation", "run_experiment"]
