"""`vatp`: the command-line front door. Each group of subcommands lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from launch import cmd_data, cmd_eval, cmd_models, cmd_train

log = logging.getLogger("vatp")


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


def _command_name(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """The subcommand path the user typed, e.g. "data inspect", for error messages."""
    names = []
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            if token.startswith("-"):
                continue
            break
        names.append(token)
        parser = subs[0].choices[token]
    return " ".join(names)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = _command_name(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # user errors (bad config, bad paths, bad values) end with one clear line
        print(f"vatp {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's: a full disk, a read-only or missing folder, no permission
        if args.verbose:
            log.exception("vatp %s", command)
        where = f": {e.filename}" if e.filename else ""
        print(f"vatp {command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
