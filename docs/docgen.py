"""The command line both page generators share: write the page, or ``--check`` that the committed
one is current (what tests/test_docs.py runs, so generated pages cannot drift)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(render: Callable[[], str], output: Path, generator: str, doc: str, argv=None) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    name = output.relative_to(ROOT)
    if args.check:
        current = output.read_text() if output.is_file() else ""
        if current != text:
            print(f"{name} is stale: run `.venv/bin/python {generator}` and commit it", file=sys.stderr)
            return 1
        print(f"{name} is current")
        return 0
    output.write_text(text)
    print(f"wrote {name}")
    return 0
