"""`vatp models`: list the encoder variants with their modality, parameters, GFLOPs per clip and input contract."""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub`."""
    p = sub.add_parser(
        "models",
        help="list encoder variants: parameters, GFLOPs per clip, input contract",
        description="List every encoder variant (models.VARIANTS) with its parameter count, forward GFLOPs for one "
        "clip/caption at its input-contract size (FlopCounterMode on the meta device; convs and matmuls, "
        "2 FLOP per multiply-add) and the contract itself.",
    )
    p.add_argument("names", nargs="*", metavar="VARIANT", help="only these variants (default: all)")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from models import VARIANTS
    from models.flops import describe_contract, variant_cost

    names = args.names or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    start = time.perf_counter()
    rows = [variant_cost(n) for n in names]
    print(format_table(rows, describe_contract))
    print(f"{len(rows)} variants in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def format_table(rows: list, describe) -> str:
    """Fixed-width table: name / modality / params / GFLOPs / input contract."""
    header = ("variant", "modality", "params", "GFLOPs/clip", "input contract")
    lines = [(r.name, r.modality, _millions(r.params), f"{r.gflops:.3g}", describe(r.contract)) for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = []
    for i, line in enumerate([header, *lines]):
        out.append(
            "  ".join(str(c).ljust(w) if j != 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(line, widths)))
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
