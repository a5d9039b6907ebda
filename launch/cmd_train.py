"""CLI subcommands: train, export, quickstart."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `export`."""


def register_quickstart(sub: argparse._SubParsersAction) -> None:
    """Add `quickstart`."""
