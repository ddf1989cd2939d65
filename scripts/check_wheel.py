"""Check that a built wheel holds every module of the source tree's package (CI; see .ci/package_check.sh).

    python scripts/check_wheel.py dist/sensitivity_lora-*.whl [--source sensitivity_lora]

Exit 0 when every ``*.py`` under the source package (and ``py.typed``) is in the wheel, 1 with the
list of what is missing otherwise. Files that only the build writes (``_build_info.py``) are
not required; compiled extensions are not compared (``--require-extension`` asks for ``_C``).
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

GENERATED = {"_build_info.py"}  # written by setup.py at build time; absent from a clean tree


def source_files(package: Path) -> set[str]:
    """Wheel paths (``sensitivity_lora/...``) of every module and marker file of the source package."""
    found = {p for p in package.rglob("*.py") if "__pycache__" not in p.parts} | set(package.rglob("py.typed"))
    return {p.relative_to(package.parent).as_posix() for p in found if p.name not in GENERATED}


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def missing_from_wheel(wheel: Path, package: Path, require_extension: bool = False) -> list[str]:
    """What the wheel lacks of the source package (sorted); empty when it is complete."""
    have = wheel_files(wheel)
    missing = sorted(source_files(package) - have)
    if require_extension and not any(n.startswith(f"{package.name}/_C.") and n.endswith((".so", ".pyd"))
                                     for n in have):
        missing.append(f"{package.name}/_C (the compiled extension)")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent / "sensitivity_lora",
                        help="the source package folder (default: the checkout's sensitivity_lora/)")
    parser.add_argument("--require-extension", action="store_true", help="the wheel must hold the compiled _C")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"{args.source} is not a folder")
    missing = missing_from_wheel(args.wheel, args.source, args.require_extension)
    if missing:
        print(f"check_wheel: {args.wheel.name} lacks {len(missing)} file(s) of the source tree:", file=sys.stderr)
        for name in missing:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"check_wheel: {args.wheel.name} holds all {len(source_files(args.source))} files of {args.source.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
