"""The `fedxray` command. Each package adds its own subcommands through an `add_commands(subparsers)`
function listed in COMMAND_MODULES; heavy imports happen inside the handlers so `--help` stays fast.

Every FedxrayError (bad data, bad bundle, bad config) ends as one clear line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

COMMAND_MODULES = ["common.cli", "inference_api.cli", "server.cli", "server.certs", "simulations.cli"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="synthetic hospitals and data checks")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write synthetic hospitals in the ChestX-ray14 layout")
    s.add_argument("--out", required=True)
    s.add_argument("--hospitals", type=int, default=3)
    s.add_argument("--patients", type=int, default=60, help="patients per hospital (1-3 images each)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--prevalence", type=float, default=0.25, help="base prevalence of each finding")
    s.add_argument("--holdout-patients", type=int, default=None, help="server-side held-out set (default: --patients)")
    s.add_argument("--bad-images", type=int, default=0, help="plant N corrupt/low-res files per hospital")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    c = dsub.add_parser("check", help="validate a data folder and print its data report")
    c.add_argument("path")
    c.add_argument("--source", default=None, help="layout (default: detected)")
    c.add_argument("--min-resolution", type=int, default=64)
    c.add_argument("--findings", default=None, help="comma-separated subset")
    c.add_argument("--uncertainty", default="u-ones", choices=["u-ones", "u-zeros", "u-ignore"])
    c.add_argument("--json", default=None, help="also write the report as JSON here")
    c.set_defaults(func=_cmd_check)

    t = sub.add_parser("train", help="centralised training -> run directory with metrics, plots and a bundle")
    t.add_argument("--config", default=None, help="TOML file with [data] [preprocess] [augment] [model] [train]")
    t.add_argument("--data", default=None, help="data path (overrides data.path)")
    t.add_argument("--source", default=None)
    t.add_argument("--out", default=None, help="run directory (overrides output_dir)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set train.epochs=3 --set model.arch=resnet18")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("demo", help="the embedded default end to end on synthetic hospitals")
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=_cmd_demo)


def _cmd_demo(a) -> int:
    """The embedded default end to end: synthetic hospitals -> federated training in Flower's simulation
    runtime -> global metrics table -> bundle at <out>/bundle, where `fedxray serve` looks by default."""
    from server.cli import federate_demo

    out = Path(a.out)
    federate_demo(data=out / "data", out=out)
    return 0


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; values parsed as JSON when possible (numbers, booleans, lists), else strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _cmd_synth(a) -> int:
    from common.data.synthetic import synthesize

    written = synthesize(a.out, hospitals=a.hospitals, patients=a.patients, size=a.size, seed=a.seed,
                         holdout_patients=a.holdout_patients, prevalence=a.prevalence, bad_images=a.bad_images)
    for name, n in written.items():
        print(f"{Path(a.out) / name}: {n} images")
    return 0


def _cmd_check(a) -> int:
    from common.config import DataConfig, ExperimentConfig
    from common.data.report import format_report
    from common.data.sources import detect_source
    from common.pipeline import prepare_data

    source = a.source or detect_source(Path(a.path))
    data = DataConfig(source=source, path=a.path, min_resolution=a.min_resolution, uncertainty=a.uncertainty,
                      findings=a.findings.split(",") if a.findings else None)
    cfg = ExperimentConfig(data=data)
    cfg.preprocess.image_size = 32  # the check decodes every image; a tiny resize keeps it cheap
    cfg.preprocess.denoise_sigma = 0
    report = prepare_data(cfg).report()
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_train(a) -> int:
    from common.config import load_config
    from common.pipeline import run_centralised

    overrides = parse_overrides(a.set)
    if a.data:
        overrides["data.path"] = a.data
    if a.source:
        overrides["data.source"] = a.source
    if a.out:
        overrides["output_dir"] = a.out
    cfg = load_config(a.config, overrides)
    summary = run_centralised(cfg)
    print(summary["table"])
    print(f"\nrun directory: {cfg.output_dir}\nbundle: {summary['bundle']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedxray", description="Federated chest X-ray diagnosis with explanations")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from common.errors import FedxrayError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"error: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
