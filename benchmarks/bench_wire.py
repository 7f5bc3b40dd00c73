"""Wire throughput: p2pser's encode + send + receive + decode against raw pyzmq, two processes, tcp loopback.

The same ~1M-parameter float32 model (four tensors, ~4 MB) is streamed from this process to a receiver
process ``--count`` times, once with raw pyzmq (DEALER -> ROUTER, ``send_multipart(copy=False)`` of a
header-sized frame plus the tensor buffers, receiver only takes the frames) and once through p2pser
(``codec.encode`` + ``ZmqTransport.send`` -> ``ZmqTransport.recv`` + ``Decoder.decode``, which checks the
checksum, finiteness and the template). Trials alternate so both see the same machine load; the result is
the ratio of median throughputs. Writes benchmarks/results/wire.json.

    python benchmarks/bench_wire.py [--count 80] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from p2pser.carriers.transport import ZmqTransport
from p2pser.exchange.codec import DEFAULT_HASH, Decoder, encode, template_of

RESULTS = Path(__file__).resolve().parent / "results" / "wire.json"
WARMUP = 3
# ~1M parameters in the proportions of a small MLP: two weight matrices and their biases.
SHAPES = {"encoder.weight": (768, 1024), "encoder.bias": (768,), "head.weight": (208, 1024), "head.bias": (208,)}


def make_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def receiver(mode: str, control: str, total: int, seed: int) -> None:
    """Receive ``total`` messages; report the endpoint, the end of warm-up and, at the end, the CPU seconds
    this process used after warm-up (all its threads), over a PUSH socket."""
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PUSH)
    ctl.connect(control)
    if mode == "raw":
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.RCVHWM, total)
        router.bind("tcp://127.0.0.1:*")
        ctl.send_string(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        for k in range(total):
            router.recv_multipart(copy=False)
            if k + 1 == WARMUP:
                ctl.send(b"warm")
                cpu = time.process_time()
        router.close(0)
    else:
        decoder = Decoder(template_of(make_model(seed)))
        transport = ZmqTransport(1, "tcp://127.0.0.1:0", {}, queue_limit=total)
        ctl.send_string(transport.endpoint)
        for k in range(total):
            got = transport.recv(60.0)
            if got is None:
                raise SystemExit("receiver: no message within 60 s")
            message = decoder.decode(got[1])
            assert message.round == k
            if k + 1 == WARMUP:
                ctl.send(b"warm")
                cpu = time.process_time()
        transport.close()
    ctl.send_string(f"done {time.process_time() - cpu}")
    ctl.close(1000)
    ctx.term()


def timed_stream(send, ctl: zmq.Socket, total: int) -> tuple[float, float]:
    """Send WARMUP untimed messages, then time the rest until the receiver reports done.

    Returns (wall seconds, CPU seconds of both processes). ``ctl`` is the control socket the receiver
    answers on ("warm", then "done <its cpu seconds>"). bench_secure_wire.py times its paths with this too.
    """
    for k in range(WARMUP):
        send(k)
    if ctl.recv() != b"warm":
        raise SystemExit("receiver protocol error")
    start, cpu = time.perf_counter(), time.process_time()
    for k in range(WARMUP, total):
        send(k)
    done, receiver_cpu = ctl.recv_string().split()
    if done != "done":
        raise SystemExit("receiver protocol error")
    return time.perf_counter() - start, time.process_time() - cpu + float(receiver_cpu)


def trial(mode: str, count: int, seed: int) -> tuple[float, float]:
    """Wall seconds to stream ``count`` messages after the warm-up, end to end (until the receiver has them),
    and the CPU seconds both processes spent on it (less sensitive than wall time to other jobs' load)."""
    model = make_model(seed)
    total = WARMUP + count
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PULL)
    ctl.bind("tcp://127.0.0.1:*")
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--mode", mode, "--control",
                             ctl.getsockopt(zmq.LAST_ENDPOINT).decode(), "--total", str(total),
                             "--seed", str(seed)])
    try:
        if not ctl.poll(30_000):
            raise SystemExit("receiver did not start")
        endpoint = ctl.recv_string()
        if mode == "raw":
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.SNDHWM, total)
            dealer.connect(endpoint)
            frames = [bytes(len(encode(model, sender=0, round=0, samples=1)[0])),
                      *(memoryview(a.reshape(-1).view(np.uint8)) for a in model.values())]

            def send(k: int) -> None:
                dealer.send_multipart(frames, copy=False)
        else:
            transport = ZmqTransport(0, "tcp://127.0.0.1:0", {1: endpoint}, queue_limit=total)

            def send(k: int) -> None:
                if not transport.send(1, encode(model, sender=0, round=k, samples=1)):
                    raise SystemExit("transport dropped a message: queue_limit too small")
        elapsed, cpu = timed_stream(send, ctl, total)
        if mode == "raw":
            dealer.close(0)
        else:
            transport.close()
    finally:
        if proc.wait(timeout=60) != 0:
            raise SystemExit(f"receiver exited with {proc.returncode}")
        ctl.close(0)
        ctx.term()
    return elapsed, cpu


def micro(seed: int, reps: int = 20) -> dict[str, float]:
    """In-process encode and decode times for one message, for the README's cost breakdown."""
    model = make_model(seed)
    decoder = Decoder(template_of(model))
    start = time.perf_counter()
    for k in range(reps):
        frames = encode(model, sender=0, round=k, samples=1)
    encode_ms = (time.perf_counter() - start) / reps * 1e3
    start = time.perf_counter()
    for _ in range(reps):
        decoder.decode(frames)
    decode_ms = (time.perf_counter() - start) / reps * 1e3
    return {"encode_ms": round(encode_ms, 3), "decode_ms": round(decode_ms, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=80, help="timed messages per trial")
    parser.add_argument("--repeats", type=int, default=9, help="trials per mode (alternating)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--role", choices=["sender", "receiver"], default="sender", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["raw", "codec"], help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        receiver(args.mode, args.control, args.total, args.seed)
        return

    model = make_model(args.seed)
    params = sum(a.size for a in model.values())
    message_bytes = sum(a.nbytes for a in model.values()) + len(encode(model, sender=0, round=0, samples=1)[0])
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"raw": [], "codec": []}
    cpu: dict[str, list[float]] = {"raw": [], "codec": []}
    for _ in range(args.repeats):
        for mode in ("raw", "codec"):
            wall, used = trial(mode, args.count, args.seed)
            seconds[mode].append(wall)
            cpu[mode].append(used / args.count * 1e3)
    mbps = {m: [args.count * message_bytes / s / 1e6 for s in v] for m, v in seconds.items()}
    cpu_ms = {m: statistics.median(v) for m, v in cpu.items()}
    raw, codec = statistics.median(mbps["raw"]), statistics.median(mbps["codec"])
    result = {
        "benchmark": "wire",
        "model_params": int(params),
        "message_bytes": int(message_bytes),
        "tensors": len(model),
        "count": args.count,
        "repeats": args.repeats,
        "raw_MBps": [round(x, 1) for x in mbps["raw"]],
        "codec_MBps": [round(x, 1) for x in mbps["codec"]],
        "raw_MBps_median": round(raw, 1),
        "codec_MBps_median": round(codec, 1),
        "ratio": round(codec / raw, 3),
        # Each codec trial against the raw trial just before it: less sensitive to load from other jobs.
        "paired_ratio_median": round(statistics.median(c / r for c, r in zip(mbps["codec"], mbps["raw"])), 3),
        "target_ratio": 0.7,
        "raw_cpu_ms_per_message": round(cpu_ms["raw"], 3),
        "codec_cpu_ms_per_message": round(cpu_ms["codec"], 3),
        # Throughput both paths would reach if CPU were the only limit: raw CPU / codec CPU per message.
        "cpu_ratio": round(cpu_ms["raw"] / cpu_ms["codec"], 3),
        **micro(args.seed),
        # Other jobs on the machine move the wall-clock numbers a lot: keep the load beside them.
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "checksum": DEFAULT_HASH,
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw pyzmq {raw:.0f} MB/s, p2pser codec+transport {codec:.0f} MB/s, ratio {codec / raw:.3f} "
          f"(target >= 0.7), paired {result['paired_ratio_median']}; CPU per message {cpu_ms['raw']:.2f} "
          f"vs {cpu_ms['codec']:.2f} ms (ratio {result['cpu_ratio']}); encode {result['encode_ms']} ms, decode {result['decode_ms']} ms per "
          f"{message_bytes / 1e6:.1f} MB message -> {args.out}")


if __name__ == "__main__":
    main()
