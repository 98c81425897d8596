"""The `fedxray` command. Each package adds its own subcommands through an `add_commands(subparsers)`
function listed in COMMAND_MODULES; heavy imports happen inside the handlers so `--help` stays fast.

This is the top layer: it imports every package, and no package imports it. Every FedxrayError (bad data,
bad bundle, bad settings) ends as one clear line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["common.cli", "inference_api.cli", "server.cli", "server.certs", "simulations.cli"]


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
