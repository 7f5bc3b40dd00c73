"""One utterance-level DP-SGD step of the default model, with and without heap blocks sized for it (issue 15).

    python benchmarks/bench_dp_step.py [--reps 3] [--steps 40]

DP-SGD (``p2pser.learn.privacy.DPSGD``, Opacus's per-sample gradients) holds a batch's worth of whole-model
gradients at every step: 16 x 1.67 M float32 = 107 MB for the ``mlp`` on ComParE. Above glibc's mmap
threshold (64 MB after ``p2pser.runtime.tune_allocator``) such a block is mapped afresh and faulted in at
every step. ``DPSGD`` now raises the threshold to its own size (``keep_blocks_up_to``). Arms, interleaved,
each in a fresh process (the setting is process-wide), one torch thread, CPU time of the process:

- ``64MB``: the threshold left at ``tune_allocator``'s 64 MB (``keep_blocks_up_to`` disabled), as before;
- ``sized``: as ``DPSGD`` sets it now.

Both arms compute the same values (only where memory lives changes); the child checks its final parameters'
hash is the same in both. Writes ``benchmarks/results/dp_step.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench_common import REPO, provenance, write_results

_CHILD = r'''
import hashlib, json, resource, sys, time
import torch
arm, steps = sys.argv[1], int(sys.argv[2])
from p2pser.runtime import pin_threads
pin_threads(1)
import p2pser.runtime
if arm == "64MB":
    p2pser.runtime.keep_blocks_up_to = lambda nbytes: None
from p2pser.learn.models import build_model
from p2pser.learn.privacy import DPSGD, PrivacyPlan
torch.manual_seed(0)
model = build_model("mlp", 6373, 1, 8)
plan = PrivacyPlan(mode="utterance", noise_multiplier=2.0, clip=1.0, delta=1e-5, sample_rate=16 / 51,
                   steps=steps + 3, target_epsilon=None)
dp = DPSGD(model, plan, expected_units=16, seed=0)
x, y = torch.randn(16, 6373, 1), torch.randint(0, 8, (16,))
opt = torch.optim.SGD(model.parameters(), lr=0.01)

def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(dp.forward(x), y, reduction="sum").backward()
    dp.privatize()
    opt.step()

for _ in range(3):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
for _ in range(steps):
    step()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"cpu_ms_per_step": round((t1 - t0) / steps * 1000, 2),
                  "user_ms_per_step": round((r1.ru_utime - r0.ru_utime) / steps * 1000, 2),
                  "system_ms_per_step": round((r1.ru_stime - r0.ru_stime) / steps * 1000, 2),
                  "minor_faults_per_step": round((r1.ru_minflt - r0.ru_minflt) / steps), "parameters_sha256": digest}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"64MB": [], "sized": []}
    for _ in range(args.reps):
        for arm in runs:
            out = subprocess.run([sys.executable, "-c", _CHILD, arm, str(args.steps)], check=True, cwd=REPO,
                                 capture_output=True, text=True).stdout
            runs[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(arm, runs[arm][-1], flush=True)
    medians = {arm: statistics.median(r["cpu_ms_per_step"] for r in rs) for arm, rs in runs.items()}
    same = len({r["parameters_sha256"] for rs in runs.values() for r in rs}) == 1
    write_results("dp_step", provenance(sys.argv) | {
        "case": "one DP-SGD step (--dp utterance) of the mlp on ComParE (1.67 M parameters), batch 16, one thread",
        "steps_per_run": args.steps, "runs": runs, "median_cpu_ms_per_step": medians,
        "speedup": round(medians["64MB"] / medians["sized"], 2), "same_parameters_in_every_run": same})


if __name__ == "__main__":
    main()
