"""p2pser simulate against Flower's simulation engine on the same task, machine and load (issue 12).

    pip install -e '.[bench]'        # flwr[simulation] (Ray backend), pinned
    python benchmarks/bench_flower.py [--cases svm,cnn1d-shallow] [--reps 2]

Inside Flower's client runs p2pser's own learner: the same features, partition (one peer per training
actor of RAVDESS fold 1, 20 peers), speaker normaliser, model and trainer (``build_peer``), so the two
engines run the same learning and differ only in how they carry it out. Each Flower client keeps its learner
(optimiser state, learning-rate schedule, random state) in its Ray worker across rounds, as a p2pser peer
does; FedAvg weights by training examples, as p2pser's hub does. Flower evaluates the global model on the
test set after every round on the server (``evaluate_fn``); p2pser's peers evaluate their own models every
round (``--eval-every 1``). Ray runs two client workers (one CPU each), at the caller's priority
(``RAY_worker_niceness=0``; Ray's default renices its workers to 15); ``p2pser simulate`` its default
learner workers (one per core).

Arms, interleaved, each ``--reps`` times, every one a fresh process timed from start to exit:

- ``flower``: ``flwr.simulation.run_simulation``, FedAvg, 20 supernodes;
- ``p2pser-fedavg``: ``p2pser simulate --algorithm fedavg --topology topologies/star-20.toml``;
- ``p2pser-dpsgd``: serverless D-PSGD on ``topologies/exponential-20.toml`` (no final averaging rounds, so
  the same 30 rounds of training).

Both fedavg arms reach the same test UA round by round (compared in the results), so the time to the same
test UA is the time of the whole run; ``ratio_flower_over_p2pser`` is the median of the Flower runs' times
over the median of the p2pser runs' times. Writes ``benchmarks/results/flower.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import DATA, REPO, provenance, write_results

RAVDESS = DATA / "ravdess"
ROUNDS, LOCAL_STEPS, BATCH = 30, 8, 16
# The case: MFCC frames (120 channels; the svm has 1,928 parameters, cnn1d-shallow 81,800), pinned
# since the run's default features became ComParE functionals.
FEATURES = "mfcc"
CASES = {  # model -> learning rate (svm: the 0.1; the CNN: its recipe's AdamW rate)
    "svm": 0.1,
    "cnn1d-shallow": None,
}


# -- the Flower arm (runs in its own process) ---------------------------------------------------------
def _setup(model: str, lr: float | None):
    """Plan, features, topology and config exactly as ``p2pser simulate`` builds them for this case."""
    import numpy as np

    from p2pser.config import RunConfig
    from p2pser.exchange.topology import load_topology
    from p2pser.partition.experiment import extract_for, make_plan, test_set

    cfg = RunConfig(fold=1, model=model, features=FEATURES, rounds=_rounds(), local_steps=LOCAL_STEPS, batch_size=BATCH, lr=lr,
                    eval_every=1, algorithm="fedavg")
    topology = load_topology(REPO / "topologies" / "star-20.toml")
    plan = make_plan(RAVDESS, cfg, topology.n)
    needed = np.unique(np.concatenate([*plan.peers, plan.test]))
    features, row_of = extract_for(plan, needed, cfg)
    test = test_set(features, row_of, plan, cfg.normalizer)
    return cfg, topology, plan, features, row_of, test


_STATE: dict = {}


def _rounds() -> int:
    """30, or fewer for a quick check of the script (P2PSER_BENCH_ROUNDS)."""
    return int(os.environ.get("P2PSER_BENCH_ROUNDS", ROUNDS))


def _learner(k: int, model: str, lr: float | None):
    """Peer ``k``'s learner, built once per Ray worker process and kept across rounds."""
    from p2pser.exchange.peer import build_peer
    from p2pser.runtime import pin_threads

    if "setup" not in _STATE:
        pin_threads(1)
        _STATE["setup"] = _setup(model, lr)
        _STATE["learners"] = {}
    cfg, topology, plan, features, row_of, test = _STATE["setup"]
    if k not in _STATE["learners"]:
        _STATE["learners"][k] = build_peer(plan, topology, k, cfg, features, row_of, test).learner
    return _STATE["learners"][k]


def _pack(state: dict) -> bytes:
    """A learner's checkpoint state as bytes (p2pser's checkpoint format: arrays and a JSON tree)."""
    import io

    import numpy as np

    from p2pser.exchange.checkpoint import _flatten

    arrays: dict = {}
    tree = _flatten(state, arrays)
    arrays["__tree__"] = np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack(data: bytes) -> dict:
    import io

    import numpy as np

    from p2pser.exchange.checkpoint import _unflatten

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return _unflatten(json.loads(bytes(archive["__tree__"]).decode()), archive)


def run_flower(model: str, lr: float | None, out: Path) -> None:
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ConfigRecord, Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from p2pser.learn import evaluation
    from p2pser.learn.models import build_model
    from p2pser.learn.tasks import task_named
    from p2pser.runtime import pin_threads

    pin_threads(1)
    cfg, topology, plan, _, _, test = _setup(model, lr)
    x_test, y_test, _ = test
    names = list(_learner(0, model, lr).template)  # the shared parameters' names, in the learner's order
    initial = [v for v in _learner(0, model, lr).snapshot().values()]
    _STATE.clear()  # the server keeps no learner; clients build theirs in their workers
    task = task_named()
    server_model = build_model(model, x_test.shape[1], x_test.shape[2], len(plan.classes), seed=cfg.seed)
    per_round: list[dict] = []
    t_start = time.monotonic()

    class Client(NumPyClient):
        def __init__(self, k: int, state) -> None:
            self.k, self.state = k, state

        def fit(self, parameters, config):
            # Ray may run a node on another worker than last round: the learner's state (optimiser, schedule
            # step, shuffling and random state) travels with the node in its Flower context, as Flower's
            # stateful clients do, so every node trains exactly as a p2pser peer that keeps its learner.
            learner = _learner(self.k, model, lr)
            if "learner" in self.state:
                learner.restore(_unpack(self.state["learner"]["checkpoint"]))
            learner.load(dict(zip(names, parameters, strict=True)))
            loss = learner.train(LOCAL_STEPS)
            self.state["learner"] = ConfigRecord({"checkpoint": _pack(learner.checkpoint_state())})
            return list(learner.snapshot().values()), learner.samples, {"loss": float(loss)}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"]), context.state).to_client()

    def evaluate_fn(server_round: int, parameters, config):
        import torch

        state = server_model.state_dict()
        for name, value in zip(names, parameters, strict=True):
            state[name] = torch.from_numpy(np.ascontiguousarray(value))
        server_model.load_state_dict(state)
        report = task.score(y_test, evaluation.scores(server_model, x_test), plan.classes)
        per_round.append({"round": server_round, "test_ua": report[task.primary], "t": time.monotonic() - t_start})
        return 0.0, {"test_ua": report[task.primary]}

    def server_fn(context: Context):
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=topology.n,
                          min_available_clients=topology.n, evaluate_fn=evaluate_fn,
                          initial_parameters=ndarrays_to_parameters(initial))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=_rounds()))

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=topology.n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    out.write_text(json.dumps({"per_round": per_round}))


# -- the orchestrator ---------------------------------------------------------------------------------
def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def _p2pser_arm(arm: str, model: str, lr: float | None, run: Path, env: dict) -> dict:
    topologies = REPO / "topologies"
    algorithm = {"p2pser-fedavg": ["--algorithm", "fedavg", "--topology", str(topologies / "star-20.toml")],
                 "p2pser-dpsgd": ["--algorithm", "dpsgd", "--topology", str(topologies / "exponential-20.toml"),
                                  "--final-mixing", "0"]}[arm]
    cmd = [sys.executable, "-m", "p2pser", "simulate", str(RAVDESS), "--fold", "1", "--model", model,
           "--features", FEATURES,
           "--rounds", str(_rounds()), "--local-steps", str(LOCAL_STEPS), "--batch-size", str(BATCH),
           "--eval-every", "1", *algorithm, "--out", str(run)]
    if lr is not None:
        cmd += ["--lr", str(lr)]
    wall = _timed(cmd, env)
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for p in sorted(run.glob("peer-*/metrics.jsonl")) for line in p.read_text().splitlines()]
    rounds = sorted({r["round"] for r in rows})
    ua = [statistics.fmean(r["test_ua"] for r in rows if r["round"] == k and "test_ua" in r) for k in rounds]
    return {"wall_s": round(wall, 2), "simulate_wall_s": summary.get("wall_s"), "test_ua_per_round": ua,
            "final_test_ua": ua[-1], "workers": summary.get("workers"), "loop_s": summary.get("loop_s"),
            "batched_peers": summary.get("batched_peers")}


def _flower_arm(model: str, lr: float | None, tmp: Path, env: dict) -> dict:
    out = tmp / "flower.json"
    cmd = [sys.executable, __file__, "--arm", "flower", "--cases", model, "--out", str(out)]
    wall = _timed(cmd, env)
    rounds = json.loads(out.read_text())["per_round"]
    ua = [r["test_ua"] for r in sorted(rounds, key=lambda r: r["round"]) if r["round"] >= 1]
    return {"wall_s": round(wall, 2), "test_ua_per_round": ua, "final_test_ua": ua[-1],
            "seconds_in_rounds": round(rounds[-1]["t"] - rounds[0]["t"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--arms", default="flower,p2pser-fedavg,p2pser-dpsgd")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="flower")
    args = parser.parse_args()
    if args.arm == "flower":
        # Imported by name, not run as __main__: Ray's workers then import the client code from this file
        # (its module globals, the learners kept across rounds, live once per worker) instead of receiving
        # pickled copies of it.
        import bench_flower

        bench_flower.run_flower(args.cases, CASES[args.cases], Path(args.out))
        return
    # Ray lowers its workers' priority to nice 15 by default (its ``worker_niceness``), so on a machine
    # that runs anything else Flower's clients would get a fraction of p2pser's share of the CPU. Both
    # engines run at the caller's priority here.
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'benchmarks'}", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", RAY_worker_niceness="0")
    arms = args.arms.split(",")
    results: dict = {"setup": {"corpus": "RAVDESS fold 1", "features": FEATURES, "peers": 20, "rounds": _rounds(), "local_steps": LOCAL_STEPS,
                               "batch_size": BATCH, "evaluation": "test UA every round",
                               "flower": _version("flwr"), "ray": _version("ray")},
                     "load_before": [round(x, 2) for x in os.getloadavg()], "cases": {}}
    with tempfile.TemporaryDirectory(prefix="p2pser-flower-") as tmp:
        tmp = Path(tmp)
        for model in args.cases.split(","):
            lr = CASES[model]
            runs: dict[str, list[dict]] = {arm: [] for arm in arms}
            for rep in range(args.reps):
                for arm in arms:
                    load = [round(x, 2) for x in os.getloadavg()]
                    if arm == "flower":
                        result = _flower_arm(model, lr, tmp, env)
                    else:
                        result = _p2pser_arm(arm, model, lr, tmp / f"{model}-{arm}-{rep}", env)
                    result["load_at_start"] = load
                    runs[arm].append(result)
                    print(f"{model} {arm} rep {rep}: {result['wall_s']} s, final test UA "
                          f"{result['final_test_ua']:.4f} (load {load[0]})", flush=True)
                    # Written after every run, marked incomplete, so that a run cut short keeps what it measured.
                    results["cases"][model] = {"lr": lr, "runs": runs, "complete": False}
                    write_results(args.name, provenance(sys.argv) | results)
            case = {"lr": lr, "runs": runs}
            med = {arm: statistics.median(r["wall_s"] for r in rs) for arm, rs in runs.items()}
            case["median_wall_s"] = med
            if "flower" in med:
                for arm in arms:
                    if arm != "flower":
                        case[f"ratio_flower_over_{arm}"] = round(med["flower"] / med[arm], 3)
                if "p2pser-fedavg" in runs:
                    a, b = runs["flower"][0]["test_ua_per_round"], runs["p2pser-fedavg"][0]["test_ua_per_round"]
                    case["fedavg_ua_max_abs_difference_per_round"] = round(
                        max(abs(x - y) for x, y in zip(a, b, strict=True)), 5)
            results["cases"][model] = case
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({m: {k: v for k, v in c.items() if k != "runs"} for m, c in results["cases"].items()}, indent=1))
    write_results(args.name, provenance(sys.argv) | results)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
