"""`rwkvseg federate`: federated training across sites with Flower (rwkvseg.federated.run.federate), and the
sites file generator (`--sites-from DATA`: BraTS institutions or seeded random sites)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._options import add_run_arguments, run_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate",
        help="federated training across sites (Flower); or write a sites file with --sites-from",
    )
    p.add_argument("config", nargs="?", help="training config with a [federated] table (TOML or YAML)")
    add_run_arguments(
        p,
        "override a setting, e.g. --set federated.rounds=5 --set optim.lr=0.001",
        "pooled dataset folder of the sites",
    )
    p.add_argument("--resume", action="store_true", help="continue the federated run in the output folder")
    p.add_argument(
        "--runtime",
        choices=("simulation", "deployment"),
        default="simulation",
        help="simulation: Flower's simulation runtime (Ray); deployment: a SuperLink and one SuperNode per site as "
        "processes on this machine (no Ray; docs/federated.md)",
    )
    p.add_argument(
        "--write-record",
        metavar="FILE",
        help="write the checkpoint record (model, preprocessing) of CONFIG's data as FILE and exit (deployment)",
    )
    g = p.add_argument_group("sites file generator")
    g.add_argument("--sites-from", metavar="DATA", help="write a sites file for this dataset folder and exit")
    g.add_argument("--sites-out", metavar="FILE", help="where --sites-from writes the sites file (JSON)")
    g.add_argument("--by", choices=("institution", "random"), default="institution", help="institution: BraTS ids")
    g.add_argument("--num-sites", type=int, default=2, help="number of random sites (--by random)")
    g.add_argument("--min-cases", type=int, default=2, help="smaller institutions are pooled into a site 'other'")
    g.add_argument("--seed", type=int, default=0, help="seed of random sites")
    g.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2: image pairs; 3: volumes (BraTS folders)")
    p.set_defaults(func=run)


def dataset_case_ids(root: str, dims: int) -> list[str]:
    """Case ids of a dataset folder: 2D image pairs, a preprocessed cache, or raw BraTS case folders."""
    if dims == 2:
        from ..data.images2d import discover_pairs

        return [s.case for s in discover_pairs(root)]
    from ..data.preprocess3d import PLANS_FILE, load_plans
    from ..data.specs import resolve_spec
    from ..data.volumes import discover_cases

    if (Path(root) / PLANS_FILE).is_file():
        return list(load_plans(root)["cases"])
    return [c.case_id for c in discover_cases(root, resolve_spec("brats", root=Path(root)), require_label=True)]


def make_sites_file(args: argparse.Namespace) -> int:
    from ..federated.sites import institution_sites, random_sites, sites_document, write_sites

    if not args.sites_out:
        raise ValueError("--sites-from needs --sites-out FILE (where to write the sites file)")
    cases = dataset_case_ids(args.sites_from, args.dims)
    if args.by == "institution":
        sites, seed = institution_sites(cases, args.min_cases), None
    else:
        sites, seed = random_sites(cases, args.num_sites, args.seed), args.seed
    write_sites(args.sites_out, sites_document(sites, args.by, seed))
    for name, members in sites.items():
        print(f"{name}: {len(members)} cases")
    print(f"wrote {len(sites)} sites ({len(cases)} cases) to {args.sites_out}")
    return 0


def write_record(config, path: str) -> int:
    """The sidecar a deployed server's checkpoints carry, from one site's data (metadata only, no images)."""
    from ..federated.run import deployment_record

    meta = deployment_record(config)
    print(f"wrote the checkpoint record of model {meta.model} ({meta.in_channels} -> {meta.num_classes}) to {path}")
    from ..files import write_json

    write_json(Path(path), meta.to_json())
    return 0


def run(args: argparse.Namespace) -> int:
    if args.sites_from:
        return make_sites_file(args)
    from ..federated.config import load_federated_config
    from ..federated.run import CONFIG_FILE, federate

    overrides = run_overrides(args)
    config_path = args.config
    if config_path is None:
        if not (args.resume and args.out):
            raise ValueError("give a config file (or --resume --out RUN_FOLDER to continue a run)")
        config_path = Path(args.out) / CONFIG_FILE
    config = load_federated_config(config_path, overrides)
    if args.write_record:
        return write_record(config, args.write_record)
    summary = federate(config, resume=args.resume, runtime=args.runtime)
    out = Path(config.train.out)
    print(
        f"{summary['rounds_done']} rounds: best pooled validation {config.train.select_metric} "
        f"{summary['best_metric']:.4f} at round {summary['best_round']}; checkpoint {out / 'best.safetensors'}"
    )
    return 0
