"""The simulator: determinism, each fault kind, sweeps through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pser.audio.synth import synthesize_corpus
from p2pser.carriers.faults import Distribution, FaultPlan, Outage
from p2pser.cli import main
from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.topology import make_topology
from p2pser.experiments.simulate import simulate_run
from p2pser.partition.experiment import extract_for, make_plan
from p2pser.report.summary import load_models, read_metrics

N = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("synth")
    synthesize_corpus(corpus, speakers=6, per_emotion=6, seed=5)
    cfg = RunConfig(model="svm", features="mfcc", max_seconds=1.5, partition="dirichlet", alpha=0.3, rounds=12, final_mixing=0,
                    local_steps=4,
                    cache_dir=str(tmp_path_factory.mktemp("cache")), eval_every=4)
    plan = make_plan(corpus, cfg, N)
    needed = np.unique(np.concatenate([*plan.peers, plan.test]))
    features, row_of = extract_for(plan, needed, cfg)
    return corpus, cfg, plan, features, row_of


def run(setup, tmp_path: Path, name: str, faults: FaultPlan | None = None, kind: str = "ring", **changes) -> dict:
    _, cfg, plan, features, row_of = setup
    faults = faults or FaultPlan()
    cfg = cfg.replace(**changes)
    topology = make_topology(kind, N)
    return simulate_run(plan, topology, kind, cfg, faults, tmp_path / name, features=features, row_of=row_of)


def metrics_without_time(run_dir: Path) -> dict:
    return {p: [{k: v for k, v in r.items() if k != "time"} for r in rows] for p, rows in read_metrics(run_dir).items()}


@pytest.mark.slow
def test_same_seed_same_metrics_run_after_run(setup, tmp_path):
    faults = FaultPlan(drop=0.2, delay=Distribution("exp", (0.02,)), step_time=Distribution("uniform", (0.01, 0.05)))
    a = run(setup, tmp_path, "a", faults, algorithm="gossip")
    b = run(setup, tmp_path, "b", faults, algorithm="gossip")
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert ma == mb  # virtual time included: the whole schedule repeats
    assert a["ua_mean"] == b["ua_mean"] and a["bytes_sent_total"] == b["bytes_sent_total"]
    run(setup, tmp_path, "c", faults, algorithm="gossip", seed=1)
    assert metrics_without_time(tmp_path / "c") != metrics_without_time(tmp_path / "a")


@pytest.mark.slow
def test_drops_are_counted_as_a_real_faulty_transport_counts_them(setup, tmp_path):
    run(setup, tmp_path, "clean")
    run(setup, tmp_path, "lossy", FaultPlan(drop=0.5))

    def total(name: str, key: str) -> int:
        return sum(rows[-1][key] for rows in read_metrics(tmp_path / name).values())

    # A lost message never entered the network: counted in dropped, not in bytes_sent. (The last rows are
    # written before the neighbours' last models arrive, so received stays a little under sent.)
    assert total("clean", "dropped") == 0
    assert total("lossy", "bytes_received") <= total("lossy", "bytes_sent")
    assert 0.3 < total("lossy", "bytes_sent") / total("clean", "bytes_sent") < 0.7
    assert total("lossy", "dropped") > 0


def _cross_cut_distance(run_dir: Path) -> float:
    """Distance between the mean final models of the lower and the upper half of the peer ids."""
    models = {p: params for p, params, _ in load_models(run_dir)}
    halves = [[models[p] for p in range(N // 2)], [models[p] for p in range(N // 2, N)]]
    means = [{k: np.mean([m[k] for m in half], axis=0) for k in half[0]} for half in halves]
    return float(np.sqrt(sum(np.sum((means[0][k] - means[1][k]) ** 2) for k in means[0])))


@pytest.mark.slow
def test_partition_stops_consensus_across_the_cut_until_it_heals(setup, tmp_path):
    run(setup, tmp_path, "whole")
    run(setup, tmp_path, "cut", FaultPlan(partition=(1, 1000)))
    run(setup, tmp_path, "healed", FaultPlan(partition=(1, 6)))
    whole, cut, healed = (_cross_cut_distance(tmp_path / n) for n in ("whole", "cut", "healed"))
    assert cut > 3 * whole
    assert healed < cut / 2
    # On a ring, peers at the cut hear one neighbour during the partition and two after it heals.
    rows = read_metrics(tmp_path / "healed")[0]
    assert [r["heard"] for r in rows if 2 <= r["round"] < 6] == [1] * 4
    assert rows[-1]["heard"] == 2


def test_a_crashed_peer_neighbours_keep_going_and_it_rejoins(setup, tmp_path):
    run(setup, tmp_path, "churn", FaultPlan(churn=(Outage(3, 2, 8), Outage(5, 4, None))))
    metrics = read_metrics(tmp_path / "churn")
    for p in (2, 4, 6):  # neighbours of the crashed peers on the ring
        assert metrics[p][-1]["round"] == 11
    rounds3 = [r["round"] for r in metrics[3]]
    # Restarted from its round-0 checkpoint, it rejoins at the round after the one its neighbours were in
    # when it pulled (the lower of the two: peer 4 lags, having waited for both its dead neighbours).
    back = rounds3[3]
    assert rounds3 == [0, 1, 2, *range(back, 12)] and 6 <= back <= 9
    assert [r["round"] for r in metrics[5]] == [0, 1, 2, 3, 4]
    # Peer 4 lost both neighbours (3 back at round 8, 5 for good): it went on alone, then with peer 3.
    assert [r["heard"] for r in metrics[4] if 5 <= r["round"]] == [0] * (back - 5) + [1] * (12 - back)
    summary = json.loads((tmp_path / "churn" / "summary.json").read_text())
    assert summary["per_peer"][5]["state"] == "crashed"


def test_convergence_stop_rule_ends_the_run_early(setup, tmp_path):
    summary = run(setup, tmp_path, "converged", consensus_threshold=1e9, patience=2, eval_every=1)
    assert summary["rounds"] < 12


@pytest.mark.slow
def test_stragglers_slow_the_virtual_clock_not_the_result(setup, tmp_path):
    fast = run(setup, tmp_path, "fast")
    slow = run(setup, tmp_path, "slow", FaultPlan(stragglers=0.25, straggler_factor=10.0))
    assert slow["virtual_time_s"] > 3 * fast["virtual_time_s"]
    assert slow["ua_mean"] == pytest.approx(fast["ua_mean"])  # dpsgd waits: same models, later


@pytest.mark.slow
def test_cli_sweep_writes_comparison_and_rejects_bad_faults(setup, tmp_path, capsys):
    corpus, cfg, *_ = setup
    common = [str(corpus), "--model", "svm", "--features", "mfcc", "--max-seconds", "1.5", "--final-mixing", "0", "--rounds", "4",
              "--local-steps", "2",
              "--cache-dir", cfg.cache_dir, "--peers", "4", "--partition", "iid"]
    assert main(["simulate", *common, "--topology", "ring,complete", "--algorithm", "dpsgd,gossip",
                 "--out", str(tmp_path / "sweep")]) == 0
    out = tmp_path / "sweep"
    table = (out / "comparison.md").read_text()
    for label in ("ring-dpsgd", "ring-gossip", "complete-dpsgd", "complete-gossip"):
        assert label in table
        assert json.loads((out / label / "summary.json").read_text())["mode"] == "simulate"
    assert (out / "comparison.png").stat().st_size > 0
    import torch

    assert torch.get_num_threads() == 1  # pinned: many small models share the cores
    assert main(["simulate", *common, "--delay", "gauss:1", "--out", str(tmp_path / "bad")]) == 2
    assert "--delay 'gauss:1' is not a distribution" in capsys.readouterr().err
    assert main(["simulate", *common, "--model", "resnet", "--out", str(tmp_path / "bad2")]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err
    with pytest.raises(UserError, match="churn entry"):
        from p2pser.carriers.faults import parse_churn

        parse_churn("3@x", 4)


def test_centralized_baseline_trains_with_the_peers_settings(setup, tmp_path):
    from p2pser.experiments.sweep import run_baseline

    corpus, cfg, *_ = setup
    cfg = cfg.replace(lr=0.05)
    summary = run_baseline(corpus, cfg, 8, tmp_path / "baseline")
    assert summary["train_config"]["lr"] == 0.05  # not TrainConfig's default: the same recipe as the peers
    assert summary["train_config"]["batch_size"] == cfg.batch_size
    assert summary["feature_spec"]["max_seconds"] == cfg.max_seconds
    assert summary["feature_spec"]["kind"] == cfg.features
    # 8 small peers each see 12 x 4 x 16 samples of their own data: dozens of epochs, not a handful.
    assert summary["epochs"] > 20


def test_random_churn_is_a_seeded_schedule_of_crashes_and_restarts():
    from p2pser.carriers.faults import parse_churn

    a = parse_churn("random:0.25", 20, rounds=40, seed=0)
    assert a == parse_churn("random:0.25", 20, rounds=40, seed=0)
    assert a != parse_churn("random:0.25", 20, rounds=40, seed=1)
    assert len(a) == 5 and len({o.peer for o in a}) == 5
    for o in a:
        assert 1 <= o.start <= 20 and 4 <= o.end - o.start <= 10
    with pytest.raises(UserError, match="FRACTION must be a number"):
        parse_churn("random:lots", 20, rounds=40)
    with pytest.raises(UserError, match="names a peer twice"):
        parse_churn("3@2-5,3@7-9", 20)


def test_a_restarted_peer_loads_its_checkpoint_and_catches_up_with_its_neighbours(setup, tmp_path):
    # Peer 3 crashes after round 6 (its last checkpoint was written after round 3) and restarts when the
    # first peer reaches round 9; its neighbours lag a little, having waited once for it.
    run(setup, tmp_path, "restart", FaultPlan(churn=(Outage(3, 6, 9),)), checkpoint_every=4, eval_every=1)
    metrics = read_metrics(tmp_path / "restart")
    rounds3 = [r["round"] for r in metrics[3]]
    back = rounds3[7]
    assert rounds3 == [*range(7), *range(back, 12)] and back >= 7  # rounds 4-6 not re-run: it caught up
    # Having adopted its neighbours' average, it is as close to them as peers that never crashed are to
    # theirs (a stale checkpoint from round 3 would be far off).
    others = sorted(rows[7]["consensus_distance"] for p, rows in metrics.items() if p != 3)
    assert metrics[3][7]["consensus_distance"] < 2 * others[len(others) // 2]


def test_summary_of_a_run_with_attackers_reports_the_honest_peers(setup, tmp_path):
    summary = run(setup, tmp_path, "attacked", attackers="1,5", attack="sign-flip", rounds=4)
    assert summary["attackers"] == [1, 5] and summary["honest_peers"] == N - 2
    honest = [p["ua"] for p in summary["per_peer"] if p["peer"] not in (1, 5)]
    assert summary["honest_test_ua_mean"] == pytest.approx(sum(honest) / len(honest))


def test_fewer_peers_than_training_speakers_gives_sites_of_several_speakers(tmp_path, capsys):
    """`--partition speaker` (the default) on a topology smaller than the fold's training speakers: each
    speaker's utterances go to exactly one peer, the sites as even as the speakers allow."""
    corpus = tmp_path / "synth16"
    synthesize_corpus(corpus, speakers=16, per_emotion=1, seed=2)
    ring8 = Path(__file__).resolve().parents[1] / "topologies" / "ring-8.toml"
    cfg = RunConfig(model="svm", features="mfcc", max_seconds=1.5, rounds=3, local_steps=2, eval_every=3, final_mixing=0,
                    cache_dir=str(tmp_path / "cache"))
    common = [str(corpus), "--model", "svm", "--features", "mfcc", "--max-seconds", "1.5", "--final-mixing", "0", "--rounds", "3",
              "--local-steps", "2", "--eval-every", "3", "--cache-dir", cfg.cache_dir]
    assert main(["simulate", *common, "--topology", str(ring8), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peers"] == 8 and len(summary["per_peer"]) == 8

    plan = make_plan(corpus, cfg, 8)
    speakers = np.array([u.speaker for u in plan.corpus.utterances])
    sites = [set(speakers[p].tolist()) for p in plan.peers]
    training = set(speakers[np.concatenate(plan.peers)].tolist())
    assert len(training) == 12 and not training & set(plan.fold.test_speakers)
    assert sum(map(len, sites)) == 12 and set().union(*sites) == training  # each speaker on exactly one peer
    assert sorted(map(len, sites)) == [1] * 4 + [2] * 4 and len({len(p) for p in plan.peers}) == 2

    capsys.readouterr()
    assert main(["simulate", *common, "--topology", "ring", "--peers", "13", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "13 peers need at least 13 training speakers and the fold has 12" in err and err.count("\n") == 1
