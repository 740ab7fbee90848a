"""`rwkvseg models`: the registered architectures (rwkvseg.models.list_models) and the released models."""

from __future__ import annotations

import argparse

PREDICTS = ("threshold", "postprocess", "flips")  # the infer.predict.prediction_defaults columns


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered architectures and the released models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.table import format_table
    from ..checkpoint import read_meta
    from ..infer.predict import prediction_defaults
    from ..models import list_models
    from ..released import released_checkpoints, released_models

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
            # what predict does by default (an ensemble's members record the same): beside the metrics, whose
            # val_threshold is the cut they were measured at
            **{f"predicts_{k}": v for k, v in prediction_defaults(read_meta(released_checkpoints(m.name)[0])).items()},
            **m.metrics,
        }
        for m in released
    ]
    metrics = list(dict.fromkeys(k for m in released for k in m.metrics))
    names = ("name", "architecture", "dataset", "split", "checkpoints", *(f"predicts_{k}" for k in PREDICTS))
    print(format_table(rows, [(k, k) for k in names] + [(k, k) for k in metrics]))
    return 0
