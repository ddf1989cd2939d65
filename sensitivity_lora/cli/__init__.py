"""sensitivity-lora: allocate LoRA ranks from Hessian sensitivity, compare allocations, export Hessians, evaluate."""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import allocate, evaluate, hessians

    parser = argparse.ArgumentParser(prog="sensitivity-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    allocate.add_parsers(sub)
    hessians.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as exc:
        print(f"sensitivity-lora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
