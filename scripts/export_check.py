"""Export models to ONNX and compare them with PyTorch: prints the check table (model, input, max abs diff, Dice).

    PYTHONPATH=src python scripts/export_check.py OUT_DIR [SOURCE ...]

SOURCE: released model names, checkpoint paths or registered model names (default: every released model).
Each export is written to OUT_DIR/<source>.onnx (an existing file is reused, so the table can be re-run).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from rwkvseg.export.onnx import export_onnx, load_source
from rwkvseg.export.verify import format_table, verify_onnx
from rwkvseg.released import released_models


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    sources = argv[1:] or [m.name for m in released_models()]
    rows = []
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
            print(f"| {source} | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]} |", flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
