"""Command-line options that several `vatp` commands share, spelled once."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE` (repeatable, values parsed as YAML) into `args.overrides`, the one override mechanism."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)
