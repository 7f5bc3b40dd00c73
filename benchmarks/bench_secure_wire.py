"""CurveZMQ cost: the secured wire path against raw CurveZMQ pyzmq, and secured vs plain runs on the test bed.

1. Wire (two processes, tcp loopback): the ~1M-parameter model of bench_wire.py streamed ``--count`` times
   with raw pyzmq sockets that use CurveZMQ (DEALER -> ROUTER, curve keys set, the receiver only takes the
   frames) and through p2pser's secured path (``codec.encode`` + ``ZmqTransport(curve=...)`` with its ZAP
   handler -> ``recv`` + ``Decoder.decode``). Trials alternate; result: ratio of median throughputs (target
   >= 0.7), also paired per trial.
2. Test bed (root only): ``launch/netns-testbed`` with three namespaces, one peer each, ``p2pser
   launch-hosts`` run with ``--security off`` and ``on`` (alternating, ``--bed-repeats`` each): seconds and
   rounds until a peer's test UA first reaches ``--target-ua`` (median over peers), application bytes sent
   per peer, and wire bytes per peer (the namespaces' eth0 tx counters: TCP/IP + CurveZMQ overhead included).

Writes benchmarks/results/secure_wire.json.

    python benchmarks/bench_secure_wire.py [--count 60] [--repeats 7] [--bed-repeats 2] [--skip-bed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wire import (  # the same model, warm-up and timing as bench_wire
    WARMUP,
    make_model,
    micro,
    timed_stream,
)

from p2pser.carriers.transport import CurveConfig, ZmqTransport
from p2pser.exchange.codec import Decoder, encode, template_of

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "secure_wire.json"
TESTBED = REPO / "launch" / "netns-testbed"


def receiver(mode: str, control: str, total: int, seed: int, keys: list[str]) -> None:
    """Receive ``total`` messages over CurveZMQ; report the endpoint, the end of warm-up and the CPU seconds
    used after warm-up over a PUSH socket. ``keys`` = [server public, server secret, client public]."""
    server_public, server_secret, client_public = keys
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PUSH)
    ctl.connect(control)
    if mode == "raw":
        router = ctx.socket(zmq.ROUTER)
        router.curve_server = True
        router.curve_secretkey, router.curve_publickey = server_secret.encode(), server_public.encode()
        router.setsockopt(zmq.RCVHWM, total)
        router.bind("tcp://127.0.0.1:*")
        ctl.send_string(router.getsockopt(zmq.LAST_ENDPOINT).decode())

        def take() -> None:
            router.recv_multipart(copy=False)
        close = router.close
    else:
        decoder = Decoder(template_of(make_model(seed)))
        transport = ZmqTransport(1, "tcp://127.0.0.1:0", {}, queue_limit=total,
                                 curve=CurveConfig(server_public, server_secret, {0: client_public}))
        ctl.send_string(transport.endpoint)

        def take() -> None:
            got = transport.recv(60.0)
            if got is None or got[0] != 0:
                raise SystemExit("receiver: no authenticated message within 60 s")
            decoder.decode(got[1])
        close = transport.close
    for k in range(total):
        take()
        if k + 1 == WARMUP:
            ctl.send(b"warm")
            cpu = time.process_time()
    ctl.send_string(f"done {time.process_time() - cpu}")
    close()
    ctl.close(1000)
    ctx.term()


def trial(mode: str, count: int, seed: int) -> tuple[float, float]:
    """Wall seconds for ``count`` messages after warm-up, end to end, and CPU seconds of both processes."""
    model = make_model(seed)
    total = WARMUP + count
    server = [k.decode() for k in zmq.curve_keypair()]
    client = [k.decode() for k in zmq.curve_keypair()]
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PULL)
    ctl.bind("tcp://127.0.0.1:*")
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--mode", mode, "--control",
                             ctl.getsockopt(zmq.LAST_ENDPOINT).decode(), "--total", str(total), "--seed", str(seed),
                            ],
                            # Z85 keys may start with "-": passed in the environment, not as arguments.
                            env=dict(os.environ, BENCH_CURVE_KEYS=" ".join([server[0], server[1], client[0]])))
    try:
        if not ctl.poll(30_000):
            raise SystemExit("receiver did not start")
        endpoint = ctl.recv_string()
        if mode == "raw":
            dealer = ctx.socket(zmq.DEALER)
            dealer.curve_serverkey = server[0].encode()
            dealer.curve_publickey, dealer.curve_secretkey = client[0].encode(), client[1].encode()
            dealer.setsockopt(zmq.SNDHWM, total)
            dealer.connect(endpoint)
            frames = [bytes(len(encode(model, sender=0, round=0, samples=1)[0])),
                      *(memoryview(a.reshape(-1).view(np.uint8)) for a in model.values())]

            def send(k: int) -> None:
                dealer.send_multipart(frames, copy=False)
            close = dealer.close
        else:
            transport = ZmqTransport(0, "tcp://127.0.0.1:0", {1: endpoint}, queue_limit=total,
                                     curve=CurveConfig(client[0], client[1], {1: server[0]}))

            def send(k: int) -> None:
                if not transport.send(1, encode(model, sender=0, round=k, samples=1)):
                    raise SystemExit("transport dropped a message: queue_limit too small")
            close = transport.close
        elapsed, cpu = timed_stream(send, ctl, total)
        close()
    finally:
        if proc.wait(timeout=60) != 0:
            raise SystemExit(f"receiver exited with {proc.returncode}")
        ctl.close(0)
        ctx.term()
    return elapsed, cpu


def wire(count: int, repeats: int, seed: int) -> dict:
    model = make_model(seed)
    message_bytes = sum(a.nbytes for a in model.values()) + len(encode(model, sender=0, round=0, samples=1)[0])
    seconds: dict[str, list[float]] = {"raw_curve": [], "p2pser_curve": []}
    cpu: dict[str, list[float]] = {"raw_curve": [], "p2pser_curve": []}
    for _ in range(repeats):
        for name, mode in (("raw_curve", "raw"), ("p2pser_curve", "p2pser")):
            wall, used = trial(mode, count, seed)
            seconds[name].append(wall)
            cpu[name].append(used / count * 1e3)
    mbps = {m: [count * message_bytes / s / 1e6 for s in v] for m, v in seconds.items()}
    raw, ours = statistics.median(mbps["raw_curve"]), statistics.median(mbps["p2pser_curve"])
    cpu_ms = {m: statistics.median(v) for m, v in cpu.items()}
    return {
        "message_bytes": int(message_bytes), "count": count, "repeats": repeats,
        "raw_curve_MBps": [round(x, 1) for x in mbps["raw_curve"]],
        "p2pser_curve_MBps": [round(x, 1) for x in mbps["p2pser_curve"]],
        "raw_curve_MBps_median": round(raw, 1), "p2pser_curve_MBps_median": round(ours, 1),
        "ratio": round(ours / raw, 3),
        "paired_ratio_median": round(statistics.median(
            o / r for o, r in zip(mbps["p2pser_curve"], mbps["raw_curve"])), 3),
        "target_ratio": 0.7,
        "raw_curve_cpu_ms_per_message": round(cpu_ms["raw_curve"], 3),
        "p2pser_curve_cpu_ms_per_message": round(cpu_ms["p2pser_curve"], 3),
        "cpu_ratio": round(cpu_ms["raw_curve"] / cpu_ms["p2pser_curve"], 3),
        **micro(seed),
    }


def _bed(*args: object) -> str:
    return subprocess.run([str(TESTBED), *map(str, args)], capture_output=True, text=True, check=True).stdout


def _tx_bytes(bed: str, k: int) -> int:
    return int(_bed("exec", bed, k, "cat", "/sys/class/net/eth0/statistics/tx_bytes"))


def _time_to_target(run: Path, n: int, target: float) -> tuple[float | None, float | None]:
    """Median over peers of the first (seconds since the peer started training, round) with test UA >= target."""
    seconds, rounds = [], []
    for k in range(n):
        rows = [json.loads(line) for line in (run / f"peer-{k:03d}" / "metrics.jsonl").read_text().splitlines()]
        hit = next((r for r in rows if (r.get("test_ua") or 0) >= target), None)
        seconds.append(hit["time"] if hit else float("inf"))
        rounds.append(hit["round"] + 1 if hit else float("inf"))
    med_s, med_r = statistics.median(seconds), statistics.median(rounds)
    return (None if med_s == float("inf") else round(med_s, 2)), (None if med_r == float("inf") else med_r)


def bed_runs(repeats: int, rounds: int, target: float, seed: int) -> dict:
    from p2pser.audio.synth import synthesize_corpus
    from p2pser.cli import main as cli
    from p2pser.config import RunConfig
    from p2pser.deploy.multihost import launch_hosts
    from p2pser.exchange.topology import Topology, make_topology, save_topology

    bed = f"bsw{os.getpid() % 10000}"
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench-secure-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        synthesize_corpus(corpus, speakers=6, per_emotion=8, seed=0)
        ring = make_topology("ring", 3, base_port=27400)
        topo = Topology("ring", tuple(type(p)(p.id, f"10.231.0.{p.id + 1}", p.port) for p in ring.peers), ring.edges)
        save_topology(topo, tmp / "topo.toml")
        cli(["keys", "new", str(tmp / "keys"), "--peers", "3"])
        hosts = tmp / "hosts.toml"
        hosts.write_text(f'[defaults]\nshell = "ip netns exec {{name}} sh -c"\npython = "{sys.executable}"\n' + "".join(
            f'[[hosts]]\nname = "{bed}-h{k}"\naddress = "10.231.0.{k + 1}"\nworkdir = "{tmp}/host{k}"\n'
            for k in range(3)))
        base = RunConfig(model="cnn1d-shallow", partition="iid", features="mfcc", max_seconds=1.5, local_steps=4,
                         rounds=rounds, seed=seed, cache_dir=str(tmp / "cache"), keys=str(tmp / "keys"))
        _bed("up", bed, 3)
        try:
            for rep in range(repeats + 1):  # the first pair only fills the feature cache
                for mode in ("off", "on"):
                    before = [_tx_bytes(bed, k) for k in range(3)]
                    out = tmp / f"run-{mode}-{rep}"
                    summary = launch_hosts(hosts, topo, "ring-3-hosts", corpus, base.replace(security=mode), out,
                                           quiet=True)
                    wire_bytes = [_tx_bytes(bed, k) - b for k, b in enumerate(before)]
                    seconds, rounds_to = _time_to_target(out, 3, target)
                    if rep == 0:
                        continue
                    runs[mode].append({
                        "seconds_to_target": seconds, "rounds_to_target": rounds_to,
                        "ua_mean": round(summary["ua_mean"], 4), "wall_s": summary["wall_s"],
                        "app_bytes_per_peer": int(np.mean([p["bytes_sent"] for p in summary["per_peer"]])),
                        "wire_bytes_per_peer": int(np.mean(wire_bytes)),
                    })
        finally:
            _bed("down", bed)

    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs[mode] if r[key] is not None]
        return statistics.median(values) if values else None

    return {"hosts": 3, "peers": 3, "topology": "ring", "rounds": rounds, "target_ua": target, "runs": runs,
            "median": {mode: {key: med(mode, key) for key in runs[mode][0]} for mode in runs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60, help="timed messages per wire trial")
    parser.add_argument("--repeats", type=int, default=7, help="wire trials per mode (alternating)")
    parser.add_argument("--bed-repeats", type=int, default=2, help="test bed runs per mode (plus one warm-up pair)")
    parser.add_argument("--bed-rounds", type=int, default=16, help="rounds of each test bed run")
    parser.add_argument("--target-ua", type=float, default=0.4, help="UA whose time to reach is measured")
    parser.add_argument("--skip-bed", action="store_true", help="only the wire comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--role", choices=["sender", "receiver"], default="sender", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["raw", "p2pser"], help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        receiver(args.mode, args.control, args.total, args.seed, os.environ["BENCH_CURVE_KEYS"].split())
        return
    load = [round(os.getloadavg()[0], 2)]
    result: dict = {"benchmark": "secure_wire", "wire": wire(args.count, args.repeats, args.seed)}
    load.append(round(os.getloadavg()[0], 2))
    w = result["wire"]
    print(f"raw CurveZMQ {w['raw_curve_MBps_median']:.0f} MB/s, p2pser secured {w['p2pser_curve_MBps_median']:.0f} "
          f"MB/s: ratio {w['ratio']} (paired {w['paired_ratio_median']}, CPU {w['cpu_ratio']}; target >= 0.7)")
    if not args.skip_bed:
        if os.geteuid() != 0:
            raise SystemExit("the test bed part needs root (network namespaces); use --skip-bed")
        result["testbed"] = bed_runs(args.bed_repeats, args.bed_rounds, args.target_ua, args.seed)
        load.append(round(os.getloadavg()[0], 2))
        print(json.dumps(result["testbed"]["median"], indent=1))
    result |= {
        # Other jobs share the 2 cores: wall-clock figures move with this.
        "loadavg_1min": load, "cpus": os.cpu_count(), "python": platform.python_version(),
        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "curve": bool(zmq.has("curve")),
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
