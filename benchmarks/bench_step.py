"""The pieces of a peer's round with the 1.67 M-parameter ``mlp`` on ComParE, in CPU milliseconds (issue 12).

    python benchmarks/bench_step.py

Each measurement runs in a fresh process (so the allocator setting is on or off from the start), one torch
thread, CPU time of the process (the machine is shared: wall time would measure the other jobs):

- ``step``: one local training step (batch 16, AdamW, the model's recipe), with the minor page faults per
  step, with glibc's default thresholds and with ``p2pser.runtime.tune_allocator``;
- ``distance`` and ``mix``: the consensus distance and the weighted average of a peer and 6 neighbours (the
  README main job's exponential graph of 12 peers) as written before (one float64 temporary of the whole
  vector per term) and now (block by block, the same bits).

Writes ``benchmarks/results/step.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench_common import REPO, provenance, write_results

_CHILD = r'''
import json, resource, sys, time
import numpy as np, torch
tuned = sys.argv[1] == "tuned"
if tuned:
    from p2pser.runtime import tune_allocator
    tune_allocator()
torch.set_num_threads(1)
from p2pser.learn.models import build_model
from p2pser.learn.trainer import LocalTrainer, recommended_config
from p2pser.exchange.mixing import Contribution, WeightedAverage, consensus_distance

def measure(f, n):
    f()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for _ in range(n):
        f()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_ms": round((time.process_time() - t0) * 1000 / n, 2),
            "sys_ms": round((r1.ru_stime - r0.ru_stime) * 1000 / n, 2),
            "minor_faults": round((r1.ru_minflt - r0.ru_minflt) / n)}

rng = np.random.default_rng(0)
model = build_model("mlp", 6373, 1, 6, seed=0)
x, y = rng.normal(size=(64, 6373, 1)).astype(np.float32), rng.integers(0, 6, 64)
trainer = LocalTrainer(model, x, y, 6, recommended_config("mlp", batch_size=16), seed=0, total_steps=1000)
out = {"step": measure(lambda: trainer.train_steps(1), 60)}
own = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}
others = [{k: v + np.float32(0.01 * (j + 1)) for k, v in own.items()} for j in range(6)]
contributions = [Contribution(j + 1, 1 / 7, o) for j, o in enumerate(others)]

def plain_distance():
    d = [sum(float(np.sum((own[k].astype(np.float64) - o[k]) ** 2)) for k in own) ** 0.5 for o in others]
    return float(np.mean(d))

def plain_mix():
    total = 1 / 7 + sum(c.weight for c in contributions)
    mixed = {}
    for name, value in own.items():
        acc = value.astype(np.float64) * ((1 / 7) / total)
        for c in contributions:
            acc += c.state[name].astype(np.float64) * (c.weight / total)
        mixed[name] = acc.astype(value.dtype)
    return mixed

out["distance_before"] = measure(plain_distance, 10)
out["distance_now"] = measure(lambda: consensus_distance(own, others), 10)
out["mix_before"] = measure(plain_mix, 10)
out["mix_now"] = measure(lambda: WeightedAverage().mix(own, 1 / 7, contributions), 10)
out["distance_same_bits"] = plain_distance() == consensus_distance(own, others)
now = WeightedAverage().mix(own, 1 / 7, contributions)
out["mix_same_bits"] = all(np.array_equal(a, now[k]) for k, a in plain_mix().items())
print(json.dumps(out))
'''


def main() -> None:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = {}
    for setting in ("default", "tuned"):
        load = round(os.getloadavg()[0], 2)
        done = subprocess.run([sys.executable, "-c", _CHILD, setting], env=env, capture_output=True, text=True,
                              check=True)
        results[setting] = json.loads(done.stdout.splitlines()[-1]) | {"load_at_start": load}
        print(setting, results[setting], flush=True)
    write_results("step", provenance(sys.argv) | {"allocator": results})


if __name__ == "__main__":
    main()
