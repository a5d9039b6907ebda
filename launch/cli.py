"""`vatp`: the command-line front door. Each group of subcommands lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from launch import cmd_data, cmd_eval, cmd_models, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vatp",
        description="Self-supervised video-audio-text pretraining: data prep, training, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmd_train.register_quickstart(sub)
    cmd_data.register(sub)
    cmd_models.register(sub)
    cmd_train.register(sub)
    cmd_eval.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # user errors (bad config, bad paths, bad values) end with one clear line
        print(f"vatp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
