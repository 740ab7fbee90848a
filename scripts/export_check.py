"""Export models to ONNX and compare them with PyTorch: prints the check table (model, input, max abs diff, Dice).

    PYTHONPATH=src python scripts/export_check.py OUT_DIR [SOURCE ...]

SOURCE: released model names, checkpoint paths or registered model names (default: every released model; an ensemble
release exports as one graph of its members' mean probability).
Each export is written to OUT_DIR/<source>.onnx (an existing file is reused, so the table can be re-run).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from rwkvseg.export.onnx import export_onnx, load_source
from rwkvseg.export.verify import format_table, verify_onnx
from rwkvseg.released import released_models


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the ONNX files (an existing export there is reused)")
    p.add_argument("sources", nargs="*", help="released model names, checkpoint paths or registered model names")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"{args.out} is a file; give a folder for the ONNX exports")
    return args


def main(argv: list[str]) -> int:
    """Check every source; exit status 1 when any of them failed (its row says why), 0 when all were checked."""
    args = parse_args(argv)
    out = args.out
    sources = args.sources or [m.name for m in released_models()]
    rows = []
    failed = []
    for source in sources:
        path = out / f"{Path(source).name}.onnx"
        try:
            start = time.perf_counter()
            loaded = load_source(source)
            if not path.exists():
                export_onnx(loaded, path)
            exported = time.perf_counter() - start
            new = verify_onnx(path, loaded, threads=2)
            rows += new
            print(format_table(new).splitlines()[-len(new) :], f"export {exported:.0f} s", flush=True)
        except Exception as err:  # one failing model must not hide the others' rows
            traceback.print_exc()
            failed.append(source)
            print(f"| {source} | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]} |", flush=True)
    print(format_table(rows))
    if failed:
        print(f"export_check.py: {len(failed)} of {len(sources)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
