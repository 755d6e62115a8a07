"""Parity of an ONNX export with its PyTorch pipeline: per component and for a whole image.

Optimum's own validation runs each component once on dummy inputs and only *logs* a warning
when the tolerance is exceeded. memedit adds: realistic inputs (tokenized prompts, the
PyTorch text embeddings as UNet input, CFG batch of 2), the whole pipeline with the same seed
and latents, mean error and image PSNR next to the max error, thresholds the user sets, and a
verdict that fails the command.

Both sides are driven through the pipelines' public components (the ORT side is Optimum's
``ORTDiffusionPipeline``), so what is compared is what users run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from memedit.families import encode_conditioning, family_of, unet_conditioning

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from optimum.onnxruntime import ORTDiffusionPipeline


@dataclass(frozen=True)
class Thresholds:
    """Pass limits. Components: absolute error of raw outputs; image: pixels in [0, 1].

    Defaults are loose enough for fp32 CPU exports of SD (observed ~1e-5 on the UNet) and
    tight enough to catch a wrong weight; fp16 exports need looser ones.
    """

    max_abs: float = 1e-3
    mean_abs: float = 1e-4
    image_max_abs: float = 2e-2
    image_psnr_db: float = 40.0


# Default limits per stored precision (``default_thresholds``). fp16 keeps 11 significant
# bits, so outputs of unit scale move by ~1e-3 per op and drift over the denoising steps;
# int8 weights move each MatMul output by up to half a quantization step per weight.
DTYPE_THRESHOLDS = {
    "fp32": Thresholds(),
    "fp16": Thresholds(max_abs=5e-2, mean_abs=5e-3, image_max_abs=1e-1, image_psnr_db=30.0),
    "bf16": Thresholds(max_abs=2e-1, mean_abs=2e-2, image_max_abs=2e-1, image_psnr_db=25.0),
    # Dynamic int8 also quantizes activations (per tensor, at run time): the tiny random
    # CLIP's unit-scale outputs move by up to 0.11 (mean 0.023) while images keep 56 dB.
    "int8": Thresholds(max_abs=5e-1, mean_abs=5e-2, image_max_abs=1e-1, image_psnr_db=30.0),
}


def default_thresholds(dtype: str = "fp32", quantize: str = "none") -> Thresholds:
    """The parity limits of an export stored in ``dtype`` (or quantized to ``quantize``)."""
    return DTYPE_THRESHOLDS[quantize if quantize != "none" else dtype]


@dataclass(frozen=True)
class ParityInputs:
    """The inputs both runtimes see."""

    prompt: str = "a photo of a red cat"
    seed: int = 0
    steps: int = 10
    guidance_scale: float = 7.5


@dataclass
class Comparison:
    """Errors of one output, ONNX Runtime against PyTorch."""

    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    passed: bool
    psnr_db: float | None = None
    limits: str = ""


@dataclass
class ParityReport:
    """All comparisons; passes if each does."""

    comparisons: list[Comparison]
    provider: str = "CPUExecutionProvider"
    seconds: float = 0.0
    thresholds: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "provider": self.provider,
                "seconds": round(self.seconds, 3), "thresholds": self.thresholds,
                "comparisons": [asdict(c) for c in self.comparisons]}

    def table(self) -> str:
        from tabulate import tabulate

        rows = [[c.name, "x".join(map(str, c.shape)), f"{c.max_abs:.3g}", f"{c.mean_abs:.3g}",
                 "-" if c.psnr_db is None else f"{c.psnr_db:.1f}", c.limits,
                 "ok" if c.passed else "FAIL"] for c in self.comparisons]
        verdict = "PASSED" if self.passed else "FAILED"
        head = f"Parity {verdict} (ONNX Runtime {self.provider} vs PyTorch, {self.seconds:.1f} s)"
        return head + "\n" + tabulate(
            rows, headers=["output", "shape", "max |Δ|", "mean |Δ|", "PSNR dB", "limits", ""])


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def compare(name: str, reference, got, thresholds: Thresholds, image: bool = False) -> Comparison:
    """Max/mean absolute error (and PSNR for images) of ``got`` against ``reference``."""
    ref, out = _numpy(reference), _numpy(got)
    if ref.shape != out.shape:
        return Comparison(name, list(out.shape), math.inf, math.inf, False,
                          limits=f"shape {list(ref.shape)} expected")
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    if not np.isfinite(out).all():
        max_abs = mean_abs = math.inf
    if image:
        value = psnr(ref, out)
        passed = max_abs <= thresholds.image_max_abs and value >= thresholds.image_psnr_db
        limits = f"max≤{thresholds.image_max_abs:g}, PSNR≥{thresholds.image_psnr_db:g}"
        return Comparison(name, list(out.shape), max_abs, mean_abs, passed, value, limits)
    passed = max_abs <= thresholds.max_abs and mean_abs <= thresholds.mean_abs
    limits = f"max≤{thresholds.max_abs:g}, mean≤{thresholds.mean_abs:g}"
    return Comparison(name, list(out.shape), max_abs, mean_abs, passed, None, limits)


def _latent_size(pipe: DiffusionPipeline) -> int:
    size = pipe.unet.config.sample_size
    return size if isinstance(size, int) else size[0]


@dataclass
class Case:
    """One parity case: the inputs both runtimes get and the PyTorch output.

    References are computed first and kept as small arrays, so that the PyTorch pipeline can
    be freed before ONNX Runtime loads: with the full SD pipeline, holding both at once
    (plus the UNet's attention activations) passes 13.5 GB of RAM.
    """

    name: str
    inputs: dict[str, torch.Tensor]
    reference: np.ndarray
    call: dict = field(default_factory=dict)  # pipeline-call arguments (image case)

    @property
    def image(self) -> bool:
        return bool(self.call)


@torch.no_grad()
def torch_references(pipe: DiffusionPipeline, inputs: ParityInputs = ParityInputs(),
                     full_pipeline: bool = True) -> list[Case]:
    """PyTorch outputs of the text encoder, UNet, VAE decoder and encoder, and of the whole
    pipeline from fixed latents. Inputs are kept on the CPU in the pipeline's dtype."""
    gen = torch.Generator("cpu").manual_seed(inputs.seed)
    family = family_of(pipe)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    cases = []
    # Every text encoder of the family (SDXL: two), each with its tokenizer, on the CFG batch
    # the pipeline runs: [prompt, ""], padded to the tokenizer's length. Output 0 is compared
    # (the last hidden state, or SDXL's pooled projection for the second encoder), and the
    # hidden state the UNet reads where it is another one (SDXL: the penultimate).
    for encoder_name, tokenizer_name in zip(family.text_encoders, family.tokenizers,
                                            strict=True):
        tokenizer = getattr(pipe, tokenizer_name)
        ids = tokenizer([inputs.prompt, ""], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        outputs = getattr(pipe, encoder_name)(ids.to(device), output_hidden_states=True)
        cases.append(Case(encoder_name, {"input_ids": ids}, _numpy(outputs[0])))
        if family.text_hidden_state is not None:  # the state the family's UNet reads
            state = outputs.hidden_states[family.text_hidden_state]
            cases.append(Case(f"{encoder_name} {_state_name(family.text_hidden_state)}",
                              {"input_ids": ids}, _numpy(state)))

    size = _latent_size(pipe)
    side = size * pipe.vae_scale_factor
    sample = torch.randn((2, pipe.unet.config.in_channels, size, size), generator=gen)
    timestep = torch.tensor(pipe.scheduler.config.num_train_timesteps // 2)
    # The UNet gets PyTorch's conditioning, as the family's pipeline builds it (SDXL: both
    # encoders' states, plus text_embeds and time_ids): its error is measured on its own.
    conditioning = unet_conditioning(pipe, encode_conditioning(pipe, [inputs.prompt, ""]),
                                     side, side)
    out = pipe.unet(sample.to(device, dtype), timestep.to(device), **conditioning).sample
    extra = conditioning.get("added_cond_kwargs", {})
    cases.append(Case("unet", {"sample": sample.to(dtype), "timestep": timestep,
                               "encoder_hidden_states":
                               conditioning["encoder_hidden_states"].cpu(),
                               **{name: value.cpu() for name, value in extra.items()}},
                      _numpy(out)))
    del out

    latents = torch.randn((1, pipe.vae.config.latent_channels, size, size), generator=gen)
    out = pipe.vae.decode(latents.to(device, dtype)).sample
    cases.append(Case("vae_decoder", {"latent_sample": latents.to(dtype)}, _numpy(out)))

    image = torch.rand((1, 3, side, side), generator=gen) * 2 - 1
    out = pipe.vae.encode(image.to(device, dtype)).latent_dist.parameters
    cases.append(Case("vae_encoder", {"sample": image.to(dtype)}, _numpy(out)))

    if full_pipeline:
        gen = torch.Generator("cpu").manual_seed(inputs.seed)
        latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=gen)
        call = {"prompt": [inputs.prompt], "num_inference_steps": inputs.steps,
                "guidance_scale": inputs.guidance_scale, "height": side, "width": side,
                "output_type": "np"}
        images = pipe(latents=latents.to(device, dtype), **call).images
        cases.append(Case(f"image ({inputs.steps} steps)", {"latents": latents.to(dtype)},
                          np.asarray(images, dtype=np.float32), call))
    return cases


def _state_name(index: int) -> str:
    return f"hidden_states[{index}]"


def _run_ort(ort_pipe: ORTDiffusionPipeline, case: Case):
    """The same case through Optimum's ORT pipeline components (what users run)."""
    if case.image:
        return ort_pipe(latents=case.inputs["latents"], **case.call).images
    if case.name.startswith("text_encoder"):
        encoder_name, _, state = case.name.partition(" ")
        encoder = getattr(ort_pipe, encoder_name)
        if not state:
            return encoder(**case.inputs)[0]
        index = int(state.removeprefix("hidden_states[").removesuffix("]"))
        return encoder(**case.inputs, output_hidden_states=True).hidden_states[index]
    if case.name == "unet":
        # Inputs past the first three are the family's added conditioning (SDXL's
        # text_embeds and time_ids), which Optimum's UNet takes as added_cond_kwargs.
        base = ("sample", "timestep", "encoder_hidden_states")
        added = {name: value for name, value in case.inputs.items() if name not in base}
        return ort_pipe.unet(**{name: case.inputs[name] for name in base},
                             added_cond_kwargs=added or None).sample
    if case.name == "vae_decoder":
        return ort_pipe.vae_decoder(**case.inputs).sample
    return ort_pipe.vae_encoder(**case.inputs).latent_dist.parameters


@torch.no_grad()
def ort_parity(ort_pipe: ORTDiffusionPipeline, cases: list[Case],
               thresholds: Thresholds = Thresholds(),
               provider: str = "CPUExecutionProvider", seconds: float = 0.0) -> ParityReport:
    """Run every case with ONNX Runtime and compare with its PyTorch reference."""
    start = time.perf_counter()
    comparisons = []
    for case in cases:
        if case.name == "vae_encoder" and getattr(ort_pipe, "vae_encoder", None) is None:
            continue  # an export without the encoder (text-to-image only needs the decoder)
        comparisons.append(compare(case.name, case.reference, _run_ort(ort_pipe, case),
                                   thresholds, image=case.image))
    return ParityReport(comparisons, provider, seconds + time.perf_counter() - start,
                        asdict(thresholds))


def check_parity(pipe: DiffusionPipeline, ort_pipe: ORTDiffusionPipeline,
                 thresholds: Thresholds = Thresholds(),
                 inputs: ParityInputs = ParityInputs(), provider: str = "CPUExecutionProvider",
                 full_pipeline: bool = True) -> ParityReport:
    """Component parity, then whole-image parity; a report with the verdict."""
    start = time.perf_counter()
    cases = torch_references(pipe, inputs, full_pipeline)
    return ort_parity(ort_pipe, cases, thresholds, provider, time.perf_counter() - start)
