"""``python -m ds.core.config check FILE``: the ``ds config`` command without the ``ds`` CLI."""

import argparse
import sys

from ds.core.config.command import configure, run

parser = argparse.ArgumentParser(prog="python -m ds.core.config")
configure(parser)
sys.exit(run(parser.parse_args()))
