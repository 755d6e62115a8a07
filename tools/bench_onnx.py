"""Benchmark the ONNX export: export time and peak memory, ORT vs PyTorch eager speed.

One run reports:
- export time (Optimum export + onnx.checker, without parity) and the export's peak RSS,
  measured in a child process so that the figure is the export's alone;
- UNet forward time (CFG batch of 2) with PyTorch eager and with ONNX Runtime, and the ratio;
- full text-to-image generation time with both, same seed, and the ratio.
Measurements only: nothing is asserted. Times are medians of ``--repeats`` runs after one
warm-up. The default model is memedit's tiny pipeline; pass ``--model DIR`` for another.

    python tools/bench_onnx.py [--model DIR] [--threads 1] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def _export_child(model: str, out: str, queue) -> None:
    """Run in a fresh process: export only, report seconds and this process's peak RSS."""
    import torch

    from memedit.export.onnx import ExportOptions, export_pipeline
    from memedit.loading import load_pipeline

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    start = time.perf_counter()
    pipe, _ = load_pipeline(model, "cpu", "float32")
    loaded = time.perf_counter() - start
    info = export_pipeline(pipe, Path(out), ExportOptions(optimum_validation=False))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    queue.put({"load_seconds": loaded, "export_seconds": info.seconds,
               "checker_seconds": info.checker_seconds, "peak_rss_mb": peak_kb / 1024,
               "files_mb": {k: v / 2**20 for k, v in info.files.items()}})


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and ORT graph optimizations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: tiny)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["BENCH_THREADS"] = str(args.threads)

    import torch

    from memedit.export.runtime import load_ort_pipeline
    from memedit.loading import load_pipeline
    from memedit.testing import save_tiny_pipeline

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="memedit-bench-"))
    model = args.model or str(save_tiny_pipeline(work / "tiny"))
    out = work / "onnx"
    figures: dict = {"model": args.model or "memedit tiny pipeline", "threads": args.threads}

    # spawn: a clean process, so its peak RSS is the export's and not this one's.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_export_child, args=(model, str(out), queue))
    child.start()
    figures["export"] = queue.get()
    child.join()

    pipe, _ = load_pipeline(model, "cpu", "float32")
    ort_pipe, choice = load_ort_pipeline(out, "auto", args.threads)
    figures["provider"] = f"{choice.label}: {choice.reason}"

    size = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=gen)
    hidden = torch.randn(2, pipe.tokenizer.model_max_length,
                         pipe.unet.config.cross_attention_dim, generator=gen)
    timestep = torch.tensor(500)

    def torch_unet():
        with torch.no_grad():
            pipe.unet(sample, timestep, hidden)

    def ort_unet():
        ort_pipe.unet(sample=sample, timestep=timestep, encoder_hidden_states=hidden)

    unet_torch = _median_time(torch_unet, args.repeats)
    unet_ort = _median_time(ort_unet, args.repeats)
    figures["unet"] = {"torch_s": unet_torch, "ort_s": unet_ort,
                       "ort_over_torch": unet_ort / unet_torch}

    def run(p):
        def call():
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                p(["a photo of a red cat"], num_inference_steps=args.steps, generator=g,
                  output_type="np")
        return call

    repeats = max(1, args.repeats // 2)
    gen_torch = _median_time(run(pipe), repeats)
    gen_ort = _median_time(run(ort_pipe), repeats)
    figures["generation"] = {"steps": args.steps, "torch_s": gen_torch, "ort_s": gen_ort,
                             "ort_over_torch": gen_ort / gen_torch}
    figures["bench_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    e = figures["export"]
    print(f"model: {figures['model']}  threads: {args.threads}  ORT {figures['provider']}")
    print(f"export: {e['export_seconds']:.2f} s (+ checker {e['checker_seconds']:.2f} s, "
          f"load {e['load_seconds']:.2f} s), peak RSS {e['peak_rss_mb']:.0f} MB")
    print(f"UNet (batch 2):       torch {unet_torch * 1e3:8.2f} ms   ORT {unet_ort * 1e3:8.2f} ms"
          f"   ORT/torch {unet_ort / unet_torch:.2f}")
    print(f"generation ({args.steps} st): torch {gen_torch:8.3f} s    ORT {gen_ort:8.3f} s"
          f"    ORT/torch {gen_ort / gen_torch:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
