"""Issue 15: what differential privacy costs and what it buys, on real speech.

RAVDESS fold 1, 20 peers (one actor each) on topologies/exponential-20.toml, the default model and recipe,
simulated (``p2pser simulate`` gives the launch's numbers exactly; BENCHMARKS.md, issue 11), each arm with
``--record-updates first-layer`` and then attacked by ``p2pser audit RUN --shadow EMODB`` (shadow peers on
EmoDB, which is disjoint from RAVDESS and labels sex). Per arm: task UA (mean of peers, average model), the
worst peer's epsilon, the attack's UAR with its 95% bootstrap interval, and the wall time of the simulation
and its CPU time (the overhead of each DP mode against no DP, same machine, same script; CPU time is the
fairer measure on a shared machine).

Arms (``--arms``, comma list, in order; each rewrites its own entry in benchmarks/results/NAME.json):
``none``, ``none-global`` (no DP, ``--normalizer global``: a check of the attack), ``speaker-10``,
``speaker-4``, ``speaker-1``, ``utterance-10``, ``utterance-4``, ``utterance-1``; ``baved-age`` (the age
audit: BAVED's speakers split into a target half and the attacker's shadow half, since no other corpus here
labels age); ``inputs`` (no run: how much sex one utterance's model input carries under each normaliser).
Delta is fixed at the default 1e-5 (below 1/20 peers and 1/51 utterances of a peer). ``--rounds`` shortens
every arm and its shadow runs alike (the default recipe's 60 rounds of the ``mlp`` do not fit a shared
machine's budget for 7 arms); the recorded updates (6.5 MB per peer and round for the ``mlp``) are deleted
after each audit unless ``--keep-updates``.

    python benchmarks/bench_privacy.py --rounds 20 --arms inputs,none,none-global,speaker-10,utterance-10
    python benchmarks/bench_privacy.py --model svm --name privacy-svm     # the linear model of issue 15's first pass
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from bench_common import DATA, REPO, RESULTS, provenance, write_results
from bench_simulate import run_timed

RAVDESS, EMODB, BAVED = DATA / "ravdess", DATA / "emodb", DATA / "baved"
# The feature cache shared by every run of this machine (keyed by content), else one under the work folder.
CACHE = Path(os.environ.get("P2PSER_CACHE_DIR", "/tmp/privacy-work/cache"))
TOPOLOGY = REPO / "topologies" / "exponential-20.toml"
ARMS = {
    "none": [],
    # A check of the attack itself: without the per-speaker normaliser, which removes most of what makes
    # one voice differ from another from every input, sex should be easier to read from the updates.
    "none-global": ["--normalizer", "global"],
    **{f"{mode}-{eps}": ["--dp", mode, "--dp-epsilon", str(eps)] for mode in ("speaker", "utterance")
       for eps in (10, 4, 1)},
}
SUMMARY_FIELDS = ("ua_mean", "ua_min", "ua_average_model", "ccc_mean", "ccc_average_model", "dp_mode", "dp_epsilon",
                  "dp_delta", "rounds", "peers")
AUDIT_FIELDS = ("attribute", "attack_uar", "ci_low", "ci_high", "chance", "attack_uar_vote", "attack_uar_pooled",
                "peers_attacked", "predictions", "shadow_corpus", "shadow_peers", "shadow_speakers", "shadow_cv_uar",
                "attack_model", "features", "attack_c", "positive_class", "shadow_positive_class",
                "attack_uar_per_round")


def cpu_seconds(log: Path) -> float | None:
    """User + system CPU seconds of a command run under /usr/bin/time -v (its log): unlike wall time, hardly
    moved by other jobs on a shared machine."""
    text = log.read_text(errors="replace") if log.exists() else ""
    parts = [float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return round(sum(parts), 1) if len(parts) == 2 else None


def audited(work: Path, name: str, simulate: list[str], audit: list[str], keep_updates: bool,
            previous: dict | None = None) -> dict:
    """Simulate one arm with its updates recorded, audit it, and (unless ``keep_updates``) delete the records
    afterwards: the ``mlp``'s are 6.5 MB per peer and round. With ``previous`` (``--reaudit``: the arm's
    entry, its run and records still there) only the audit is redone, reusing its shadow runs too."""
    out = work / name
    if previous is not None and (out / "summary.json").exists():
        sim = previous["simulate"]
    else:
        sim = run_timed(["simulate", *simulate, "--record-updates", "first-layer", "--cache-dir", str(CACHE),
                         "--out", str(out)], work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    aud = run_timed(["audit", str(out), *audit], work / f"{name}-audit.log")
    result = json.loads((out / "audit.json").read_text())
    if not keep_updates:
        for path in out.rglob("updates.npz"):
            path.unlink()
    return {"simulate": sim | {"cpu_s": sim.get("cpu_s") or cpu_seconds(work / f"{name}.log")}, "audit_command": aud["command"],
            "audit_wall_s": aud["wall_s"], "audit_cpu_s": cpu_seconds(work / f"{name}-audit.log"),
            **{k: summary.get(k) for k in SUMMARY_FIELDS}, **{k: result.get(k) for k in AUDIT_FIELDS}}


def arm(work: Path, name: str, args: argparse.Namespace, previous: dict | None) -> dict:
    return audited(work, name, [str(RAVDESS), "--fold", "1", "--topology", str(TOPOLOGY), *model_flags(args),
                                *ARMS[name]],
                   ["--shadow", str(EMODB), "--shadow-folds", str(args.shadow_folds)], args.keep_updates, previous)


def model_flags(args: argparse.Namespace) -> list[str]:
    """The flags that differ from the defaults: none unless ``--model``/``--rounds`` are given."""
    return ([] if args.model is None else ["--model", args.model]) + \
        ([] if args.rounds is None else ["--rounds", str(args.rounds)])


def input_leakage(args: argparse.Namespace) -> dict:
    """How much of a speaker's sex the model's inputs still carry under each normaliser, from RAVDESS's
    (default) features with an L2 logistic regression: from one utterance (6-fold cross-validation grouped by
    speaker), and from a speaker's per-emotion means of speaker-standardised features (leave one speaker
    out), which is what a first-layer update is made of (``p2pser.experiments.audit.describe_update``).
    What an update is computed from bounds what it can give away."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from p2pser.config import RunConfig
    from p2pser.experiments.centralized import prepare_pooled
    from p2pser.features.normalize import standardize_by_speaker
    from p2pser.partition.experiment import feature_spec

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000, class_weight="balanced"))

    def uar(y, pred):
        return float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)]))

    cfg = RunConfig(**({} if args.model is None else {"model": args.model}))
    pooled = prepare_pooled(RAVDESS, feature_spec(cfg), cache_dir=CACHE, progress=False)
    f, order = pooled.features, sorted(pooled.row_of)
    rows = np.array([pooled.row_of[i] for i in order])
    sex = np.array([pooled.experiment.corpus.utterances[i].sex == "F" for i in order], dtype=int)
    emotion = pooled.experiment.labels[order]
    x, speakers = f.x[rows], f.speakers[rows]
    own = standardize_by_speaker(x, f.lengths[rows], speakers).reshape(len(x), -1)
    out = {"features": cfg.features, "utterances": len(x), "speakers": len(np.unique(speakers))}
    for name, v in (("global", x.reshape(len(x), -1)), ("speaker", own)):
        pred = cross_val_predict(model(), v, sex, groups=speakers, cv=GroupKFold(n_splits=6))
        out[f"sex_uar_utterance_{name}_normalizer"] = uar(sex, pred)
    ids = np.unique(speakers)
    means = np.stack([np.concatenate([own[(speakers == s) & (emotion == e)].mean(axis=0) for e in np.unique(emotion)])
                      for s in ids])
    truth = np.array([sex[speakers == s][0] for s in ids])
    pred = cross_val_predict(model(), means, truth, groups=ids, cv=LeaveOneGroupOut())
    out["sex_uar_speaker_emotion_means_speaker_normalizer"] = uar(truth, pred)
    return out


def baved_halves(work: Path) -> tuple[Path, Path]:
    """BAVED's speakers split into two disjoint corpora (manifests over the shared audio, written under
    ``work``): the target (even positions in speaker order) and the attacker's shadow (odd positions), each
    with 5 speaker folds. No other corpus here labels age, so the shadow must be BAVED's other half."""
    import csv

    rows = list(csv.DictReader((BAVED / "MANIFEST.tsv").open(), delimiter="\t"))
    speakers = sorted({r["speaker"] for r in rows})
    halves = []
    for half, name in ((0, "target"), (1, "shadow")):
        own = speakers[half::2]
        folder = work / f"baved-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "manifest.tsv").open("w") as fh:
            fh.write("file\tspeaker\tsex\tage\tarousal[-1,1]\n")
            for r in rows:
                if r["speaker"] in own:
                    fh.write(f"{BAVED / r['file']}\t{r['speaker']}\t{r['sex']}\t{r['age']}\t{r['arousal']}\n")
        folds = [{"test_speakers": own[k::5]} for k in range(5)]
        (folder / "folds.json").write_text(json.dumps({"folds": folds}, indent=1))
        halves.append(folder)
    return halves[0], halves[1]


def age_arm(work: Path, args: argparse.Namespace, previous: dict | None) -> dict:
    """The age audit on BAVED: the target half, fold 1, one peer per training speaker on an exponential graph;
    shadow peers on the other half (one fold); arousal regression, the corpus's only task."""
    target, shadow = baved_halves(work)
    # --workers 1: what a recording run uses anyway; the automatic choice sizes a model by its classes, of
    # which a dimensional task has none.
    flags = [str(target), "--fold", "1", "--task", "dimensional", "--topology", "exponential", "--workers", "1",
             *model_flags(args)]
    return audited(work, "baved-age", flags, ["--shadow", str(shadow), "--attribute", "age", "--shadow-folds", "1"],
                   args.keep_updates, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/privacy-work"))
    parser.add_argument("--shadow-folds", type=int, default=2,
                        help="EmoDB folds the attacker simulates (2 cover all 10 speakers as shadow peers)")
    parser.add_argument("--name", default="privacy", help="results file name")
    parser.add_argument("--model", default=None,
                        help="the model of every arm (default: the default model, as the issue asks)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of every arm and its shadow runs (default: the recipe's; fewer to fit a budget)")
    parser.add_argument("--keep-updates", action="store_true",
                        help="keep the recorded updates after each audit (default: delete them, they are large)")
    parser.add_argument("--reaudit", action="store_true",
                        help="arms already run (records kept): redo only their audit, keep the simulation's entry")
    args = parser.parse_args()
    work = args.work / (args.model or "default")
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    written = json.loads(path.read_text()) if path.exists() else {}
    results, inputs = written.get("arms", {}), written.get("input_leakage")
    for name in args.arms.split(","):
        if name == "inputs":
            inputs = input_leakage(args) | provenance(sys.argv)
        elif name in ARMS or name == "baved-age":
            previous = results.get(name) if args.reaudit else None
            results[name] = age_arm(work, args, previous) if name == "baved-age" else arm(work, name, args, previous)
            entry = results[name]
            print(f"{name}: UA {entry['ua_mean']}, CCC {entry['ccc_mean']}, epsilon {entry['dp_epsilon']}, "
                  f"attack UAR {entry['attack_uar']} [{entry['ci_low']}, {entry['ci_high']}]", flush=True)
        else:
            raise SystemExit(f"unknown arm {name!r}; known: {', '.join(ARMS)}, baved-age, inputs")
        base = results.get("none")
        for other, entry in results.items():
            entry["simulate"].setdefault("cpu_s", cpu_seconds(work / f"{other}.log"))
            if base is not None and other != "baved-age":
                entry["wall_overhead_vs_none"] = round(entry["simulate"]["wall_s"] / base["simulate"]["wall_s"] - 1, 3)
                if entry["simulate"]["cpu_s"] and base["simulate"]["cpu_s"]:
                    entry["cpu_overhead_vs_none"] = round(entry["simulate"]["cpu_s"] / base["simulate"]["cpu_s"] - 1, 3)
                entry["ua_drop_vs_none"] = None if entry["ua_mean"] is None else base["ua_mean"] - entry["ua_mean"]
        write_results(args.name, {"arms": results, "input_leakage": inputs, "delta": 1e-5,
                                  "model": args.model or "default", "rounds": args.rounds or "default"}
                      | provenance(sys.argv))

if __name__ == "__main__":
    main()
