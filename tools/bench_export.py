"""Benchmark production exports side by side on this machine's CPU.

Rows: PyTorch eager, ``torch.compile`` (where it compiles within ``--compile-timeout``), ONNX
Runtime on Optimum's unfused fp32 graph, on the fused fp32 graph (``--optimize basic``: the
fusions the CPU provider runs) and on the int8 graph (``--quantize int8``); ORT fp16 too for
the embedded model (the CPU provider runs it, though not fast). Columns: the UNet step (CFG
batch of 2), the full generation (embedded model only), the export time (Optimum + memedit's
transformation), the folder size, and peak RSS of the export and of the runtime, each phase
measured in its own fresh process so that the peak is that phase's alone. Parity of each ORT
variant's UNet output against PyTorch's is reported next to its time.

Targets:
- ``embedded``: memedit's 11 MB test model (the whole pipeline, every variant exported with
  ``memedit.export.onnx.export_pipeline``);
- ``full-unet``: the full-size SD 1.x UNet (860 M parameters, 3.4 GB fp32, random weights,
  1 % of each ``ff.net.2`` weight zeroed), exported alone through Optimum's per-model path
  (``tools/export_full_size_unet.py``), then fused / quantized by memedit's step, and
  audited. Generation needs the whole 512x512 pipeline and is not timed here.

Measurements only: nothing is asserted. Times are medians of ``--repeats`` after a warm-up.
Use one thread (the default) for a fair comparison on a shared machine.

    python tools/bench_export.py --target embedded --json embedded.json
    nice -n 10 python tools/bench_export.py --target full-unet --repeats 2 --json full.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # export_full_size_unet

GB = 1024**3
VARIANTS = {  # name -> ExportOptions keywords
    "ort-unfused": {},
    "ort-fused": {"optimize": "basic"},
    "ort-int8": {"quantize": "int8"},
    "ort-fp16": {"dtype": "fp16"},
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def first_and_median(fn, repeats: int) -> tuple[float, float]:
    """Seconds of the first call (warm-up, with any compilation) and median of the rest."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _child(queue, fn_name: str, kwargs: dict, max_rss_gb: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from export_full_size_unet import RssMonitor

    RssMonitor(max_rss_gb)  # the machine is shared: abort this phase rather than swap

    torch.set_num_threads(kwargs["threads"])
    try:
        result = globals()[fn_name](**kwargs)
    except Exception as err:  # a failing row is a figure too (e.g. torch.compile)
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    result["peak_rss_mb"] = round(_peak_mb())
    queue.put(result)


MAX_RSS_GB = 12.0


def in_child(fn_name: str, timeout: float | None = None, **kwargs) -> dict:
    """Run ``fn_name(**kwargs)`` in a fresh spawned process; its figures and peak RSS."""
    import queue as queues

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    max_rss_gb = float(os.environ.get("BENCH_MAX_RSS_GB", MAX_RSS_GB))
    process = ctx.Process(target=_child, args=(queue, fn_name, kwargs, max_rss_gb))
    start = time.perf_counter()
    process.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=5)
        except queues.Empty:
            if not process.is_alive():
                result = {"error": f"the phase died (exit {process.exitcode}; over "
                                   f"{max_rss_gb:g} GB RSS aborts it)"}
            elif timeout is not None and time.perf_counter() - start > timeout:
                process.terminate()
                result = {"error": f"did not finish within {timeout:.0f} s"}
    process.join()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(fn_name, kwargs.get("variant", ""), json.dumps(result), flush=True)
    return result


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


# ---- embedded model: whole pipeline --------------------------------------------------------

def export_embedded(model: str, out: str, variant: str, threads: int) -> dict:
    from memedit.export.onnx import ExportOptions, export_pipeline
    from memedit.loading import load_pipeline

    pipe, _ = load_pipeline(model, "cpu", "float32")
    info = export_pipeline(pipe, Path(out), ExportOptions(optimum_validation=False,
                                                          **VARIANTS[variant]))
    return {"export_seconds": round(info.seconds + info.optimize_seconds, 2),
            "optimum_seconds": round(info.seconds, 2),
            "transform_seconds": round(info.optimize_seconds, 2), "folder_mb": _folder_mb(
                Path(out))}


def _unet_inputs(config: dict, tokens: int = 77):
    import torch

    gen = torch.Generator().manual_seed(0)
    size = config["sample_size"] if isinstance(config["sample_size"], int) else \
        config["sample_size"][0]
    sample = torch.randn(2, config["in_channels"], size, size, generator=gen)
    hidden = torch.randn(2, tokens, config["cross_attention_dim"], generator=gen)
    return sample, torch.tensor(500), hidden


def run_embedded(model: str, onnx_dir: str | None, variant: str, threads: int, steps: int,
                 repeats: int, reference: str) -> dict:
    """UNet step and generation with PyTorch (eager / compiled) or ONNX Runtime."""
    import numpy as np
    import torch

    from memedit.export.runtime import load_ort_pipeline
    from memedit.loading import load_pipeline

    figures: dict = {}
    if onnx_dir is None:
        pipe, _ = load_pipeline(model, "cpu", "float32")
        pipe.set_progress_bar_config(disable=True)
        if variant == "torch-compile":
            pipe.unet = torch.compile(pipe.unet)
        config = dict(pipe.unet.config)

        def unet():
            with torch.no_grad():
                return pipe.unet(sample, timestep, hidden).sample.numpy()
    else:
        pipe, _ = load_ort_pipeline(onnx_dir, "cpu", threads)
        config = json.loads((Path(onnx_dir) / "unet" / "config.json").read_text())

        def unet():
            return np.asarray(pipe.unet(sample=sample, timestep=timestep,
                                        encoder_hidden_states=hidden).sample)
    sample, timestep, hidden = _unet_inputs(config)
    first, figures["unet_step_s"] = first_and_median(unet, repeats)
    figures["first_call_s"] = round(first, 3)
    out = unet()
    if variant == "torch-eager":
        np.save(reference, out)
    elif Path(reference).is_file():
        figures["unet_max_abs_vs_torch"] = float(np.abs(out - np.load(reference)).max())

    def generation():
        with torch.no_grad():
            pipe(["a photo of a red cat"], num_inference_steps=steps, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    _, figures["generation_s"] = first_and_median(generation, max(1, repeats // 2))
    return figures


def bench_embedded(args: argparse.Namespace, work: Path) -> dict:
    from memedit.testbed import model_path

    model = str(args.model or model_path())
    rows: dict = {}
    common = {"threads": args.threads, "steps": args.steps, "repeats": args.repeats,
              "reference": str(work / "reference.npy"), "model": model}
    rows["torch-eager"] = in_child("run_embedded", onnx_dir=None, variant="torch-eager",
                                   **common)
    rows["torch-compile"] = in_child("run_embedded", args.compile_timeout, onnx_dir=None,
                                     variant="torch-compile", **common)
    for variant in VARIANTS:
        out = work / variant
        export = in_child("export_embedded", model=model, out=str(out), variant=variant,
                          threads=args.threads)
        rows[variant] = {"export": export} | in_child("run_embedded", onnx_dir=str(out),
                                                      variant=variant, **common)
    return rows


# ---- full-size SD 1.x UNet ----------------------------------------------------------------

def _full_unet(fraction: float = 0.01):
    """The full-size UNet with fixed random weights and 1 % of each ff.net.2 zeroed."""
    import torch
    from diffusers import UNet2DConditionModel

    from memedit.testing import SD1_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD1_UNET_CONFIG).eval()
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for name, param in unet.named_parameters():
        if name.endswith("ff.net.2.weight"):
            masks[name] = torch.rand(param.shape, generator=gen) < fraction
            param.data[masks[name]] = 0
    return unet, masks


def full_torch(variant: str, threads: int, repeats: int, work: str) -> dict:
    import numpy as np
    import torch

    unet, masks = _full_unet()
    if variant == "torch-eager":  # the audit's reference: the masked weights and masks
        torch.save({"params": {k: unet.get_parameter(k).detach().clone() for k in masks},
                    "masks": masks}, Path(work) / "masked.pt")
    sample, timestep, hidden = _unet_inputs(dict(unet.config))
    if variant == "torch-compile":
        unet = torch.compile(unet)

    def step():
        with torch.no_grad():
            return unet(sample, timestep, hidden).sample.numpy()
    first, median = first_and_median(step, repeats)
    if variant == "torch-eager":
        np.save(Path(work) / "reference.npy", step())
    return {"unet_step_s": median, "first_call_s": round(first, 2)}


def full_export(variant: str, threads: int, work: str) -> dict:
    """Export (unfused) or transform a copy of the unfused export (fused, int8)."""
    from export_full_size_unet import export_unet_alone

    from memedit.export.optimize import ComponentSettings, optimize_component
    from memedit.export.quantize import quantize_component

    folder = Path(work) / variant / "unet"
    start = time.perf_counter()
    if variant == "ort-unfused":
        unet, _ = _full_unet()
        export_unet_alone(unet, folder)
        del unet
    else:
        shutil.copytree(Path(work) / "ort-unfused" / "unet", folder)
        start = time.perf_counter()  # the copy is not part of the transformation
        if variant == "ort-fused":
            optimize_component(folder / "model.onnx", "unet", ComponentSettings("basic"))
        elif variant == "ort-fp16":
            optimize_component(folder / "model.onnx", "unet", ComponentSettings(dtype="fp16"))
        else:
            quantize_component(folder / "model.onnx")
    return {"seconds": round(time.perf_counter() - start, 1),
            "folder_mb": _folder_mb(folder)}


def full_audit(variant: str, threads: int, work: str) -> dict:
    import torch

    from memedit.export.audit import audit_onnx_file

    saved = torch.load(Path(work) / "masked.pt")
    start = time.perf_counter()
    results = audit_onnx_file(Path(work) / variant / "unet" / "model.onnx", saved["params"],
                              saved["masks"])
    return {"audit_seconds": round(time.perf_counter() - start, 1),
            "audit_passed": all(r.passed for r in results), "audited_tensors": len(results),
            "layouts": sorted({m.split(" (")[1] for r in results for m in r.matches})}


def full_ort(variant: str, threads: int, repeats: int, work: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    from memedit.export.runtime import session_options
    from memedit.testing import SD1_UNET_CONFIG

    start = time.perf_counter()
    session = ort.InferenceSession(str(Path(work) / variant / "unet" / "model.onnx"),
                                   session_options(threads),
                                   providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    sample, timestep, hidden = _unet_inputs(SD1_UNET_CONFIG)
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy().astype(np.float32),
             "encoder_hidden_states": hidden.numpy()}
    first, median = first_and_median(lambda: session.run(None, feeds), repeats)
    (out,) = session.run(None, feeds)
    reference = np.load(Path(work) / "reference.npy")
    return {"load_s": round(load, 1), "unet_step_s": median, "first_call_s": round(first, 2),
            "unet_max_abs_vs_torch": float(np.abs(out - reference).max()),
            "unet_mean_abs_vs_torch": float(np.abs(out - reference).mean())}


def bench_full_unet(args: argparse.Namespace, work: Path) -> dict:
    """The rows asked for (``--rows``); a row not asked for reuses what an earlier run left
    in ``--work`` (the PyTorch reference and masks, the unfused export)."""
    rows: dict = {}
    common = {"threads": args.threads, "work": str(work)}
    if "torch-eager" in args.rows:
        rows["torch-eager"] = in_child("full_torch", variant="torch-eager",
                                       repeats=args.repeats, **common)
    for variant in ("ort-unfused", "ort-fused", "ort-int8", "ort-fp16"):
        if variant not in args.rows:
            continue
        if args.reuse_export and (work / variant / "unet" / "model.onnx").is_file():
            rows[variant] = {"export": {"reused": str(work / variant)}}
        else:
            rows[variant] = {"export": in_child("full_export", variant=variant, **common)}
        if "error" in rows[variant]["export"]:  # nothing of this variant to audit or run
            shutil.rmtree(work / variant, ignore_errors=True)
            continue
        rows[variant]["audit"] = in_child("full_audit", variant=variant, **common)
        rows[variant] |= in_child("full_ort", variant=variant, repeats=args.repeats, **common)
        if variant != "ort-unfused" and not args.reuse_export:  # the others start from it
            shutil.rmtree(work / variant, ignore_errors=True)
    if "torch-compile" in args.rows and args.compile_timeout > 0:
        rows["torch-compile"] = in_child("full_torch", args.compile_timeout,
                                         variant="torch-compile", repeats=args.repeats,
                                         **common)
    return rows


def table(rows: dict) -> str:
    """A markdown table of the rows."""
    lines = ["| variant | UNet step (s) | vs eager | generation (s) | export (s) | folder (MB) "
             "| export peak RSS (MB) | run peak RSS (MB) | UNet max abs vs torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    eager = rows.get("torch-eager", {}).get("unet_step_s")
    for name, row in rows.items():
        export = row.get("export", {})
        step = row.get("unet_step_s")
        speed = f"{eager / step:.2f}x" if step and eager else "-"

        def cell(value, fmt="{:.3g}"):
            return "-" if value is None else fmt.format(value)
        lines.append(
            f"| {name} | {cell(step)} | {speed} | {cell(row.get('generation_s'))} | "
            f"{cell(export.get('export_seconds', export.get('seconds')))} | "
            f"{cell(export.get('folder_mb'))} | {cell(export.get('peak_rss_mb'), '{:.0f}')} | "
            f"{cell(row.get('peak_rss_mb'), '{:.0f}')} | "
            f"{cell(row.get('unet_max_abs_vs_torch'))} |"
            + (f" error: {row['error']}" if "error" in row else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["embedded", "full-unet"], default="embedded")
    parser.add_argument("--model", default=None, help="pipeline folder (embedded target)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-timeout", type=float, default=600,
                        help="seconds torch.compile may take (0: skip it)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept)")
    parser.add_argument("--rows", default="torch-eager,torch-compile,ort-unfused,ort-fused,"
                        "ort-int8,ort-fp16",
                        help="full-unet: the rows to measure (comma-separated)")
    parser.add_argument("--reuse-export", action="store_true",
                        help="full-unet: measure the exports an earlier run left in --work")
    parser.add_argument("--max-rss-gb", type=float, default=MAX_RSS_GB,
                        help="abort a phase whose RSS passes this")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.rows = args.rows.split(",")
    os.environ["BENCH_MAX_RSS_GB"] = str(args.max_rss_gb)  # read by in_child
    work = args.work or Path(tempfile.mkdtemp(prefix="memedit-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import torch

    figures = {"target": args.target, "threads": args.threads, "repeats": args.repeats,
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    run = bench_embedded if args.target == "embedded" else bench_full_unet
    figures["rows"] = run(args, work)
    figures["load_average_at_end"] = os.getloadavg()
    print(table(figures["rows"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
