"""Benchmark: locating vs plain sampling for the same UNet calls, and peak memory vs prompts.

For each prompt count N (default 10 and 100), a fresh process loads the model and
  1. samples the N prompts for the first tau UNet calls with no layer hooks (plain), then
  2. records the method's statistics for the same prompts and calls (locate),
and reports both times, their ratio (the hook overhead) and the process's peak RSS. Each N
runs in its own process so that peak memory is that N's alone.

    .venv/bin/python tools/bench_locate.py                  # embedded model, N = 10 and 100
    .venv/bin/python tools/bench_locate.py --model DIR --prompts FILE --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

from tabulate import tabulate


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from memedit.hooks import ActivationRecorder, StopDenoising
    from memedit.loading import load_pipeline
    from memedit.locate import LocateConfig, record_statistics
    from memedit.prompts import PromptSet, read_prompts
    from memedit.sampling import SamplingConfig, batches, run_pipeline

    pipe, source = load_pipeline(args.model, device=args.device)
    if args.prompts:
        pool = read_prompts(args.prompts).prompts
    else:
        from memedit.testbed import prompt_file

        pool = read_prompts(prompt_file("memorized_locate")).prompts
    prompts = [pool[i % len(pool)] for i in range(args.count)]
    sampling = SamplingConfig(steps=args.steps, batch_size=args.batch_size)
    config = LocateConfig(tau=args.tau, sampling=sampling)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def plain_sampling() -> None:
        # The same UNet calls as locating (the recorder with no layers only stops the loop).
        with ActivationRecorder(pipe, [], args.tau) as counter, torch.inference_mode():
            for batch in batches(prompts, sampling.batch_size):
                counter.start_pipeline_call()
                with contextlib.suppress(StopDenoising):
                    run_pipeline(pipe, batch, [0] * len(batch), sampling, output_type="latent")

    def locating():
        return record_statistics(pipe, PromptSet.from_prompts(prompts), config, source,
                                 progress=False)

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    run_pipeline(pipe, prompts[:1], [0], SamplingConfig(steps=2))  # warm-up: lazy inits
    # Alternate the two and keep each one's best run: other load on the machine only slows.
    plain_times, locate_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain_sampling))
        locate_times.append(timed(locating))
    plain, locate = min(plain_times), min(locate_times)
    stats = locating()
    accumulator_bytes = sum(t.numel() * t.element_size() for t in stats.sumsq.values())
    return {"prompts": args.count, "unet_calls_per_batch": args.tau, "plain_s": plain,
            "locate_s": locate, "overhead_ratio": locate / plain, "repeats": args.repeats,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_loaded, "accumulator_kb": accumulator_bytes / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: embedded)")
    parser.add_argument("--prompts", default=None, help="prompt file (cycled to each count)")
    parser.add_argument("--counts", default="10,100")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.count is not None:
        print(json.dumps(worker(args)))
        return
    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        command = [sys.executable, __file__, "--count", str(count)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if v is not None and k not in ("counts", "json", "count")]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"N={count} done", file=sys.stderr)
    print(tabulate([[r["prompts"], f"{r['plain_s']:.2f}", f"{r['locate_s']:.2f}",
                     f"{r['overhead_ratio']:.2f}x", f"{r['peak_rss_mb']:.0f}",
                     f"{r['accumulator_kb']:.0f}"] for r in rows],
                   headers=["prompts", "plain s", "locate s", "locate/plain", "peak RSS MB",
                            "statistics KB"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "count"},
                       "results": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
