"""`rwkvseg models`: the registered architectures (rwkvseg.models.list_models) and the released models."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered architectures and the released models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.table import format_table
    from ..models import list_models
    from ..released import released_models

    print("architectures (create_model / model.name):")
    print("  " + ", ".join(list_models()))
    released = released_models()
    print("\nreleased models (rwkvseg predict --model NAME INPUT --out OUT):")
    if not released:
        print("  none installed")
        return 0
    rows = [
        {
            "name": m.name,
            "architecture": m.architecture,
            "dataset": m.dataset,
            "split": m.split,
            "checkpoints": len(m.files),  # more than one: an ensemble, predicted as one model
            **m.metrics,
        }
        for m in released
    ]
    metrics = list(dict.fromkeys(k for m in released for k in m.metrics))
    columns = [(k, k) for k in ("name", "architecture", "dataset", "split", "checkpoints")]
    print(format_table(rows, columns + [(k, k) for k in metrics]))
    return 0
