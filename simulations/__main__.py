"""`python -m simulations [EXPERIMENT] [--set KEY=VALUE ...]`: see simulations/cli.py."""
import sys

from simulations.cli import main

sys.exit(main())
