"""``p2pser train``: the centralized baseline, one model per fold on the pooled training speakers."""

from __future__ import annotations

import argparse

from p2pser.cli.features import add_spec_arguments, spec_from_args
from p2pser.config import (
    AUGMENT_COPIES_HELP,
    AUGMENT_HELP,
    DP_ACCOUNTANTS,
    DP_MODES,
    NORMALIZERS,
    REGRESSION_LOSSES,
    TASKS,
    RunConfig,
    check_dp_values,
)
from p2pser.features.cache import default_cache_dir
from p2pser.runtime import pin_threads

# The baseline starts from the decentralized run's defaults (one place, the light config module), so
# `p2pser train --help` names them without importing torch.
DEFAULT_MODEL = RunConfig.model
DEFAULT_FEATURES = RunConfig.features
# Pooled training perturbs by default: two speed-perturbed copies raised the validation UA on held-out
# training speakers of both corpora (EmoDB fold 1: 85.9 -> 87.4%, RAVDESS fold 1: 61.3 -> 63.0%;
# benchmarks/bench_ser.py validate, BENCHMARKS.md "Augmentation"). The decentralized commands keep
# RunConfig's "none" until peers with copies are measured; `--dp` turns the default off (a copy is another
# record of an utterance).
DEFAULT_AUGMENT, DEFAULT_AUGMENT_COPIES = "speed", 2


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="centralized baseline: train on the pooled training speakers of each fold, test on the rest"
    )
    p.add_argument("data_dir", metavar="DIR", help="corpus folder (or manifest), as for `p2pser data info`")
    p.add_argument("--folds", default=None, help="folds file (default DIR/folds.json)")
    p.add_argument("--fold", default="all", help="fold number, comma list (1,3) or 'all' (default all)")
    p.add_argument("--test-speakers", default=None, help="comma list of test speakers: one fold instead of --folds")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name from the registry (default {DEFAULT_MODEL})")
    add_spec_arguments(p, kind=DEFAULT_FEATURES)
    # --features is the name users and the simulator know the feature kind by; --kind stays as its alias.
    p.add_argument("--features", dest="kind", default=argparse.SUPPRESS,
                   help=f"feature kind, same as --kind (default {DEFAULT_FEATURES})")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the model's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: the model's recipe)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's recipe)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this share of training utterances and keep the epoch with the best validation "
                        "UA (CCC for --task dimensional) (default 0: train on all, keep the last epoch)")
    p.add_argument("--normalizer", choices=NORMALIZERS, default=RunConfig().normalizer,
                   help="feature standardisation: each speaker by their own statistics (test speakers too, from "
                        "their own unlabelled audio), or the training data's statistics (global, local) "
                        f"[{RunConfig().normalizer}]")
    p.add_argument("--task", choices=TASKS, default=RunConfig.task,
                   help="emotion categories (UA), dimensions arousal/valence/dominance by regression (CCC), or "
                        f"both with one model [{RunConfig.task}]")
    p.add_argument("--regression-loss", choices=REGRESSION_LOSSES, default=RunConfig.regression_loss,
                   help=f"dimensions: 1 - CCC per minibatch, or mean squared error [{RunConfig.regression_loss}]")
    p.add_argument("--augment", default=None,
                   help=AUGMENT_HELP + f" [{DEFAULT_AUGMENT}; none with --dp]")
    p.add_argument("--augment-copies", type=int, default=DEFAULT_AUGMENT_COPIES,
                   help=AUGMENT_COPIES_HELP + f" [{DEFAULT_AUGMENT_COPIES}]")
    p.add_argument("--seed", type=int, default=0, help="seed for initial weights, shuffling, augmentation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/BLAS threads (default 1: fastest when other work shares the cores)")
    p.add_argument("--workers", type=int, default=None, help="feature extraction processes (default: all CPUs)")
    p.add_argument("--cache-dir", default=None,
                   help=f"feature cache folder (default $P2PSER_CACHE_DIR or {default_cache_dir()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create for the results")
    add_dp_arguments(p)
    p.set_defaults(func=_run)


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    """The pooled model's differential privacy (issue 15; the decentralized runs take the same keys)."""
    p.add_argument("--dp", choices=DP_MODES, default="none",
                   help="DP-SGD with each utterance, or each speaker (all their utterances), as the protected "
                        "unit [none]")
    p.add_argument("--dp-epsilon", type=float, default=None, help="--dp: target epsilon of the whole training")
    p.add_argument("--dp-delta", type=float, default=RunConfig.dp_delta,
                   help=f"--dp: delta, below 1/records [{RunConfig.dp_delta}]")
    p.add_argument("--dp-clip", type=float, default=1.0, help="--dp: L2 bound of a unit's gradient [1.0]")
    p.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help="--dp: noise std / clip instead of calibrating to --dp-epsilon (then a cap)")
    p.add_argument("--dp-accountant", choices=DP_ACCOUNTANTS, default="rdp", help="--dp: Opacus accountant [rdp]")


def dp_from_args(args: argparse.Namespace):
    from p2pser.experiments.centralized import PooledDP

    check_dp_values(args.dp, args.dp_epsilon, args.dp_delta, args.dp_clip, args.dp_noise_multiplier,
                    lambda name: "--" + name.replace("_", "-"))
    if args.dp == "none":
        return None
    return PooledDP(args.dp, args.dp_epsilon, args.dp_delta, args.dp_clip, args.dp_noise_multiplier,
                    args.dp_accountant)


def _augment(args: argparse.Namespace) -> str:
    if args.augment is not None:
        return args.augment
    return "none" if args.dp != "none" else DEFAULT_AUGMENT


def _run(args: argparse.Namespace) -> int:
    # Heavy imports (torch) only when the command runs: `p2pser --help` stays fast.
    from p2pser.experiments.centralized import format_results, train_centralized
    from p2pser.features.augment import perturbations
    from p2pser.learn.tasks import task_of_summary
    from p2pser.learn.trainer import recommended_config

    pin_threads(max(1, args.threads))
    cfg = recommended_config(args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             regression_loss=args.regression_loss)
    summary = train_centralized(
        args.data_dir, args.out, folds_path=args.folds, fold=args.fold, test_speakers=args.test_speakers,
        model_name=args.model, spec=spec_from_args(args), train_cfg=cfg, seed=args.seed,
        val_fraction=args.val_fraction, cache_dir=args.cache_dir, workers=args.workers,
        progress=not args.no_progress, normalizer=args.normalizer, task=args.task, dp=dp_from_args(args),
        augment=perturbations(_augment(args), args.augment_copies),
    )
    print(format_results(summary, task_of_summary(summary)))
    print(f"results: {args.out}/summary.json" + (f", confusion matrix: {args.out}/confusion.png"
                                                  if summary["confusion"] is not None else ""))
    return 0
