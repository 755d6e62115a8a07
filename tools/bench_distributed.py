"""Benchmark: memedit on 1 vs N processes (`accelerate launch`), and a paper estimate of a full
Wen et al. run on 1, 8 and 64 GPUs.

Each process count runs in fresh processes (one thread each) on the embedded model:
  1. locate: record the statistics of P prompts for the first tau UNet calls,
  2. generate: draw I images (evaluate's main cost),
  3. detect: Wen et al.'s detector on the same I prompt/seed pairs,
timed between barriers (model loading excluded), with each process's peak RSS and a digest of
the statistics and images, which must be the same for every process count. Then the per-call
times measured on one process and an assumed GPU time per call (``--gpu-ms-per-call``: no GPU
here, so it is an assumption, stated as such in the output) give the wall time of Wen et al.'s
500 memorized prompts + 1,000 reference captions on 1, 8 and 64 GPUs, batch by batch (a round
of batches takes as long as one batch; the last round may be partly idle).

    nice -n 10 .venv/bin/python tools/bench_distributed.py --json bench_distributed.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate


def worker(args: argparse.Namespace) -> None:
    """One process of the run (launched N times by accelerate, or once directly)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from memedit import distributed
    from memedit.evaluation.detector import DetectorConfig, noise_magnitudes
    from memedit.loading import load_pipeline
    from memedit.locate import LocateConfig, record_statistics
    from memedit.prompts import PromptSet, read_prompts
    from memedit.sampling import SamplingConfig, generate_images
    from memedit.testbed import prompt_file

    current = distributed.state()
    pipe, source = load_pipeline(None, device="cpu")
    pool = read_prompts(prompt_file("ordinary_unseen")).prompts
    prompts = PromptSet.from_prompts([pool[i % len(pool)] for i in range(args.prompts)],
                                     "bench")
    sampling = SamplingConfig(steps=args.steps, batch_size=args.batch_size)
    images_prompts = [pool[i % len(pool)] for i in range(args.images)]
    seeds = list(range(100, 100 + args.images))
    times: dict[str, float] = {}
    digests: dict[str, str] = {}

    def phase(name: str, run) -> object:
        distributed.barrier()
        start = time.perf_counter()
        result = run()
        distributed.barrier()
        times[name] = time.perf_counter() - start
        return result

    stats = phase("locate", lambda: record_statistics(
        pipe, prompts, LocateConfig(tau=args.tau, sampling=sampling), source,
        progress=False))
    digests["locate"] = hashlib.sha256(b"".join(
        stats.sumsq[k].numpy().tobytes() for k in sorted(stats.sumsq))).hexdigest()
    images = phase("generate", lambda: generate_images(pipe, images_prompts, seeds, sampling))
    digests["generate"] = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    detector = DetectorConfig(args.detector_steps, sampling)
    magnitudes = phase("detect", lambda: noise_magnitudes(pipe, images_prompts, seeds, detector))
    digests["detect"] = hashlib.sha256(np.ascontiguousarray(magnitudes).tobytes()).hexdigest()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gathered = distributed.all_gather({"rank": current.rank, "peak_rss_mb": round(peak_mb)})
    if current.is_main:
        Path(args.worker_out).write_text(json.dumps({
            "processes": current.world, "seconds": times, "digests": digests,
            "per_process": gathered}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(processes: int, args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-dist-")) / "result.json"
    script = [str(Path(__file__).resolve()), "--worker", "--worker-out", str(out),
              "--prompts", str(args.prompts), "--images", str(args.images), "--steps",
              str(args.steps), "--tau", str(args.tau), "--batch-size", str(args.batch_size),
              "--detector-steps", str(args.detector_steps)]
    command = [sys.executable, *script] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
        "no", "--main_process_port", str(_free_port()), *script]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    result = json.loads(out.read_text())
    result["wall_with_launch_and_load"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------ paper estimate


@dataclass(frozen=True)
class Phase:
    """One sampling phase of a full run: ``items`` prompt (x seed) rows in batches of
    ``batch``, each costing ``calls`` UNet calls (an Adam step of the attack counts as
    ``calls`` forward-equivalents)."""

    name: str
    items: int
    calls: int
    batch: int = 8


def wen_phases(seeds: int = 4, steps: int = 50, tau: int = 10, detector_steps: int = 5,
               attack_steps: int = 50, attack_pairs: int = 8) -> list[Phase]:
    """Wen et al.'s 500 memorized prompts and 1,000 reference captions, memedit's defaults:
    locate on both sets (tau calls each), evaluate the original and the sanitized model
    (500 x seeds images of steps + 1 PNDM calls, the detector on 1,500 x seeds, 1,000
    ordinary images), and the embedding attack on the 500 (forward + backward ~ 3 forward
    calls per pair and step, then one generation per seed)."""
    pndm = steps + 1
    variants = 2
    return [
        Phase("locate (500 memorized + 1,000 reference)", 1500, tau),
        Phase("evaluate: memorized images", variants * 500 * seeds, pndm),
        Phase("evaluate: detector", variants * 1500 * seeds, detector_steps),
        Phase("evaluate: ordinary images", variants * 1000, pndm),
        Phase("attack: optimize", 500, attack_steps * attack_pairs * 3, batch=10),
        Phase("attack: generate", 500 * seeds, pndm),
    ]


def estimate_hours(phases: list[Phase], seconds_per_prompt_call: float, gpus: int,
                   efficiency: float) -> float:
    """Wall hours on ``gpus``: every phase runs ceil(batches / gpus) rounds of one batch, a
    batch costing batch x calls x seconds_per_prompt_call, divided by the parallel
    ``efficiency`` (gathering results, the work every process repeats)."""
    total = 0.0
    for phase in phases:
        rounds = math.ceil(math.ceil(phase.items / phase.batch) / gpus)
        total += rounds * phase.batch * phase.calls * seconds_per_prompt_call
    return total / (efficiency if gpus > 1 else 1.0) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--prompts", type=int, default=96, help="prompts to locate on")
    parser.add_argument("--images", type=int, default=48, help="images to generate")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--detector-steps", type=int, default=5)
    parser.add_argument("--gpu-ms-per-call", type=float, default=32.0,
                        help="ASSUMED GPU time of one prompt's UNet call (both guidance "
                             "halves), SD 1.x at 512x512, fp16. Default: 31 it/s, SD 1.5 in "
                             "diffusers (torch 2.1, SDPA) at batch 1 on an A100 80GB, from "
                             "github.com/fal-ai/stable-diffusion-benchmarks; batching only "
                             "lowers it")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    runs = [run_world(int(n), args) for n in args.processes.split(",")]
    base = runs[0]
    rows = []
    for run in runs:
        speedup = {k: base["seconds"][k] / run["seconds"][k] for k in run["seconds"]}
        run["speedup_vs_first"] = speedup
        run["identical_to_first"] = run["digests"] == base["digests"]
        rows.append([run["processes"],
                     *(f"{run['seconds'][k]:.1f} s (x{speedup[k]:.2f})"
                       for k in ("locate", "generate", "detect")),
                     f"{run['wall_with_launch_and_load']:.1f} s",
                     ", ".join(str(p["peak_rss_mb"]) for p in run["per_process"]),
                     "yes" if run["identical_to_first"] else "NO"])
    print(f"embedded model, one thread per process: locate {args.prompts} prompts (tau "
          f"{args.tau}), generate {args.images} images ({args.steps} steps), detector on "
          f"them ({args.detector_steps} steps); batch {args.batch_size}")
    print(tabulate(rows, headers=["processes", "locate", "generate", "detect",
                                  "wall (launch + load)", "peak RSS MB per process",
                                  "same bits"]))

    # Per-call times on one process (the embedded model's: a scale, not SD 1.x's).
    one = base["seconds"]
    per_call = {"locate": one["locate"] / (args.prompts * args.tau),
                "generate": one["generate"] / (args.images * args.steps),
                "detect": one["detect"] / (args.images * args.detector_steps)}
    last = runs[-1]
    efficiency = (sum(one.values()) / sum(last["seconds"].values())) / last["processes"]
    phases = wen_phases()
    seconds_per_call = args.gpu_ms_per_call / 1000
    estimate = {gpus: {"ideal": estimate_hours(phases, seconds_per_call, gpus, 1.0),
                       "at_measured_efficiency": estimate_hours(phases, seconds_per_call, gpus,
                                                                efficiency)}
                for gpus in (1, 8, 64)}
    print("\nmeasured per prompt-call on 1 CPU thread (embedded model): "
          + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in per_call.items()))
    print(f"parallel efficiency measured on {last['processes']} CPU processes: "
          f"{efficiency:.2f}")
    print(f"paper estimate, Wen et al. 500 memorized + 1,000 reference captions, ASSUMING "
          f"{args.gpu_ms_per_call:g} ms per prompt-call on one GPU:")
    print(tabulate([[p.name, p.items, p.calls, p.items * p.calls] for p in phases],
                   headers=["phase", "rows", "calls/row", "prompt-calls"]))
    print(tabulate([[g, f"{h['ideal']:.2f} h", f"{h['at_measured_efficiency']:.2f} h"]
                    for g, h in estimate.items()],
                   headers=["GPUs", "wall (no overhead)",
                            f"wall (efficiency {efficiency:.2f})"]))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": vars(args) | {"json": str(args.json)}, "runs": runs,
            "per_prompt_call_seconds_cpu": per_call, "parallel_efficiency": efficiency,
            "estimate": {"assumed_gpu_ms_per_prompt_call": args.gpu_ms_per_call,
                         "phases": [vars(p) for p in phases],
                         "hours_by_gpus": estimate}}, indent=2))


if __name__ == "__main__":
    main()
