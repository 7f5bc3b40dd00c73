"""``p2pser audit RUN``: attack a finished run's recorded updates to measure what they reveal."""

from __future__ import annotations

import argparse

from p2pser.runtime import pin_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit", help="attribute-inference attack (speaker sex, age) on the updates a run's peers sent"
    )
    p.add_argument("run", metavar="RUN", help="a finished run folder made with --record-updates first-layer")
    p.add_argument("--shadow", default=None, metavar="DIR",
                   help="the attacker's corpus, disjoint from the run's, labelling the attribute: shadow peers are "
                        "trained on it with the run's settings (default: the first other corpus beside the run's, "
                        "or under $P2PSER_SHARED_DATA, that fits, e.g. EmoDB for a RAVDESS run)")
    p.add_argument("--attribute", default="sex", choices=("sex", "age"),
                   help="what to infer: speaker sex, or age (older than the median speaker) [sex]")
    p.add_argument("--shadow-folds", type=int, default=None,
                   help="shadow runs, one per fold of the shadow corpus (default: all its folds)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples of the 95%% interval [1000]")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack model and the bootstrap [0]")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from p2pser.experiments.audit import AUDIT, AUDIT_PLOT, audit_run, format_audit

    pin_threads(1)
    audit = audit_run(args.run, args.shadow, attribute=args.attribute, folds=args.shadow_folds,
                      bootstrap=args.bootstrap, seed=args.seed)
    print(format_audit(audit))
    print(f"results: {args.run}/{AUDIT}, plot: {args.run}/{AUDIT_PLOT}")
    return 0
