"""``p2pser simulate``: many peers in one process on a virtual clock, with faults and sweeps."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from p2pser.config import RunConfig, SimConfig, add_config_arguments, expand_sweep, field_names, load_config

RUN_SWEEP = ("algorithm", "model", "partition")
SIM_SWEEP = ("topology",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate many peers in one process (same peer code, virtual clock, faults, sweeps)"
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder, partitioned among the peers")
    p.add_argument("--out", required=True, metavar="RUN", help="new run folder for results")
    add_config_arguments(p, RunConfig, sweep=RUN_SWEEP)
    add_config_arguments(p, SimConfig, config_flag=False, sweep=SIM_SWEEP)
    p.set_defaults(func=_run)


def _cases(args: argparse.Namespace):
    from p2pser.experiments.sweep import Case

    run_combos = expand_sweep(args, RunConfig, RUN_SWEEP) or [{}]
    sim_combos = expand_sweep(args, SimConfig, SIM_SWEEP) or [{}]
    scalar = {k: v for k, v in vars(args).items() if k not in RUN_SWEEP + SIM_SWEEP}
    cases = []
    for run_over, sim_over in itertools.product(run_combos, sim_combos):
        run = load_config(args.config, scalar | run_over, RunConfig, "run", other_keys=field_names(SimConfig))
        sim = load_config(args.config, scalar | sim_over, SimConfig, "simulate", other_keys=field_names(RunConfig))
        swept = [str(v) for k, v in (sim_over | run_over).items()
                 if len(str(getattr(args, k)).split(",")) > 1]
        cases.append(Case("-".join(swept).replace("/", "_"), run, sim))
    return cases


def _run(args: argparse.Namespace) -> int:
    from p2pser.experiments.sweep import run_baseline, run_cases
    from p2pser.learn.tasks import task_of_summary
    from p2pser.report.comparison import write_comparison
    from p2pser.report.run_folder import prepare_out_dir
    from p2pser.report.summary import add_baseline
    from p2pser.report.tables import print_summary

    cases = _cases(args)
    out = prepare_out_dir(args.out)
    summaries = run_cases(args.data_dir, cases, out)
    baseline = None
    if cases[0].sim.baseline == "centralized":
        cfg = cases[0].run
        baseline = run_baseline(args.data_dir, cfg, summaries[0]["peers"], out / "baseline-centralized")
        summaries = [add_baseline(out / s["label"] if len(summaries) > 1 else out, s, baseline, task_of_summary(s))
                     for s in summaries]
    for s in summaries:
        print(f"\n== {s['label']}")
        print_summary(s, str(Path(args.out) / (s["label"] if len(summaries) > 1 else "")))
    if len(summaries) > 1 or baseline is not None:
        table = write_comparison(out, summaries, baseline)
        print("\n" + table.read_text())
        print(f"comparison: {table}, {out / 'comparison.png'}")
    return 0
