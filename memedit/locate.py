"""Locate: record activation statistics for the memorized and the reference prompts, then
select the weights memorized prompts lean on and reference prompts do not."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import platform
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from memedit.errors import MemeditError
from memedit.families import pipeline_conditioning
from memedit.hooks import ActivationRecorder, StopDenoising
from memedit.loading import ModelSource
from memedit.prompts import PromptSet, empty_reference
from memedit.sampling import SamplingConfig, batches, run_pipeline
from memedit.selection import GRANULARITIES, select_layer
from memedit.statistics import ActivationStats
from memedit.subspace import FORMAT, FORMAT_VERSION, Subspace, model_identity
from memedit.targets import TARGET_KINDS, TargetLayer, find_target_layers, parse_target_kinds
from memedit.weights import read_tensors, split_key, tensor_sha256, zero_masked

if TYPE_CHECKING:
    from memedit.calibration import CalibrationConfig
    from memedit.hardening import HardenConfig


@dataclass(frozen=True)
class LocateConfig:
    """The method's hyperparameters; defaults are the authors' best memorization setting."""

    targets: tuple[str, ...] = ("ff_out",)
    k: float = 0.01
    tau: int = 10
    rho: float = 0.0
    granularity: str = "weight"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> None:
        parse_target_kinds(self.targets)
        if not 0 < self.k <= 1:
            raise MemeditError(f"k must be in (0, 1], got {self.k}.",
                               "k is a fraction of each layer's inputs: the authors use 0.01.")
        if self.tau < 1:
            raise MemeditError(f"tau must be at least 1, got {self.tau}.",
                               "tau counts the first UNet calls to aggregate: default 10.")
        if not 0 <= self.rho < 1:
            raise MemeditError(f"rho must be in [0, 1), got {self.rho}.",
                               "rho = 0 keeps the union over the tau calls.")
        if self.granularity not in GRANULARITIES:
            raise MemeditError(f"Unknown granularity {self.granularity!r}.",
                               f"Use one of {', '.join(GRANULARITIES)}.")


def unet_calls_per_image(pipe, steps: int) -> int:
    """How many times the pipeline calls the UNet for ``steps`` (PNDM: 50 steps = 51 calls)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _hash_weights(pipe, source: ModelSource | None, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors as stored in the model's files (as loaded, for an in-memory pipeline)."""
    if source is not None:
        return read_tensors(source.path, keys, source.allow_pickle)
    out = {}
    for key in keys:
        component, name = split_key(key)
        out[key] = getattr(pipe, component).get_parameter(name).detach().cpu()
    return out


def model_fingerprint(pipe, source: ModelSource | None, layers: list[TargetLayer]) -> str:
    """One hash over the targeted weights: statistics of different models never merge."""
    tensors = _hash_weights(pipe, source, [layer.key for layer in layers])
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(f"{key}={tensor_sha256(tensors[key])};".encode())
    return digest.hexdigest()


def _settings(pipe, source, layers, config: LocateConfig, unet_calls: int) -> dict:
    return {
        "model_fingerprint": model_fingerprint(pipe, source, layers),
        "scheduler": type(pipe.scheduler).__name__,
        "steps": config.sampling.steps,
        "guidance_scale": config.sampling.guidance_scale,
        "seed": config.sampling.seed,
        "height": config.sampling.height,
        "width": config.sampling.width,
        "targets": list(config.targets),
        "unet_calls": unet_calls,
    }


def record_statistics(pipe, prompts: PromptSet, config: LocateConfig,
                      source: ModelSource | None = None, progress: bool = True) -> ActivationStats:
    """Denoise ``prompts`` for the first tau UNet calls only, recording the target layers.

    Every prompt uses the same seed (the authors' protocol), in batches of
    ``config.sampling.batch_size``; both guidance halves pass through the hooks.
    """
    if not len(prompts):
        raise MemeditError(f"The prompt set {prompts.name} is empty.", "Pass at least one prompt.")

    def run(batch: list[str]) -> None:
        run_pipeline(pipe, batch, [config.sampling.seed] * len(batch), config.sampling,
                     output_type="latent")

    return _record(pipe, prompts.prompts, run, prompts.name, prompts.sha256, config, source,
                   progress)


def record_embedding_statistics(pipe, embeds: torch.Tensor, name: str, config: LocateConfig,
                                source: ModelSource | None = None,
                                progress: bool = True) -> ActivationStats:
    """The same recording, driven by text conditionings ``y [N, T, d]`` instead of prompts
    (what an embedding attack optimizes; ``memedit.families`` says what ``y`` holds for each
    family). The text encoder does not run, so the targets must
    be UNet layers; the unconditional half is the empty prompt's, as in generation."""
    layers = find_target_layers(pipe, config.targets)
    if any(layer.component != "unet" for layer, _ in layers):
        raise MemeditError("Embeddings bypass the text encoder: its layers cannot be recorded "
                           "from them.", "Use UNet targets only (ff_out, ff_in, attn2_k, "
                           "attn2_v).")
    digest = hashlib.sha256(embeds.detach().float().cpu().numpy().tobytes()).hexdigest()

    def run(batch: list[torch.Tensor]) -> None:
        run_pipeline(pipe, None, [config.sampling.seed] * len(batch), config.sampling,
                     output_type="latent", **pipeline_conditioning(pipe, torch.stack(batch)))

    return _record(pipe, list(embeds), run, name, digest, config, source, progress)


def _record(pipe, items: list, run, name: str, sha256: str, config: LocateConfig,
            source: ModelSource | None, progress: bool) -> ActivationStats:
    """Run ``run`` on batches of ``items`` under the recorder, stopping after tau UNet calls."""
    config.validate()
    layers = find_target_layers(pipe, config.targets)
    available = unet_calls_per_image(pipe, config.sampling.steps)
    if config.tau > available:
        raise MemeditError(
            f"tau = {config.tau} exceeds the {available} UNet calls of {config.sampling.steps} "
            "denoising steps.",
            f"Lower --tau to at most {available}, or raise --steps.",
        )
    needs_unet = any(layer.component == "unet" for layer, _ in layers)
    unet_calls = config.tau if needs_unet else 0
    item_batches = list(batches(items, config.sampling.batch_size))
    bar = tqdm(total=len(item_batches) * max(unet_calls, 1), disable=not progress,
               desc=f"recording {name}", unit="UNet call")
    recorder = ActivationRecorder(pipe, layers, unet_calls, on_unet_call=lambda: bar.update(1))
    with recorder, torch.inference_mode():
        for batch in item_batches:
            recorder.start_pipeline_call()
            with contextlib.suppress(StopDenoising):
                run(batch)
            if not needs_unet:
                bar.update(1)
    bar.close()
    return ActivationStats(
        {key: value.cpu() for key, value in recorder.sumsq.items()},
        len(items),
        _settings(pipe, source, [layer for layer, _ in layers], config, unet_calls),
        [{"name": name, "count": len(items), "sha256": sha256}],
    )


def select_subspace(pipe, memorized: ActivationStats, reference: ActivationStats,
                    config: LocateConfig, source: ModelSource | None = None,
                    allow_empty: bool = False) -> Subspace:
    """Turn the two sets' statistics into masks (method steps 4-6) and a manifest.

    A selection of no weight at all is an error unless ``allow_empty``: baked, it would be
    an unedited model that calls itself sanitized.
    """
    config.validate()
    if memorized.settings != reference.settings:
        raise MemeditError(
            "The memorized and reference statistics were recorded with different settings.",
            "Record both with the same model, sampler and --targets.")
    layers = find_target_layers(pipe, config.targets)
    fingerprint = model_fingerprint(pipe, source, [layer for layer, _ in layers])
    if memorized.settings.get("model_fingerprint") != fingerprint:
        raise MemeditError("These statistics were recorded on another model.",
                           "Record statistics on the model you locate on.")
    if memorized.settings["unet_calls"] and config.tau > memorized.settings["unet_calls"]:
        raise MemeditError(
            f"tau = {config.tau} exceeds the {memorized.settings['unet_calls']} UNet calls "
            "the statistics hold.", "Lower --tau or record again with a larger one.")
    norms_mem, norms_ref = memorized.column_norms(), reference.column_norms()
    masks = {}
    for layer, module in layers:
        if layer.key not in norms_mem:
            raise MemeditError(f"The statistics have no entry for {layer.key}.",
                               "Record them with the same --targets.")
        masks[layer.key] = select_layer(module.weight.detach().cpu(), norms_mem[layer.key],
                                        norms_ref[layer.key], config.k, config.tau, config.rho,
                                        config.granularity).cpu()
    if not allow_empty and not any(mask.any() for mask in masks.values()):
        raise MemeditError(
            f"No weight was selected: in none of the {len(masks)} target layers did the "
            f"memorized prompts ({memorized.num_prompts}) lean on a weight more than the "
            "reference prompts do.",
            "Check that the prompts are memorized (`memedit detect`), raise --k or --tau, or "
            "pass --allow-empty to write the empty subspace anyway.")
    return Subspace(masks, build_manifest(pipe, source, masks, config, memorized, reference))


def build_manifest(pipe, source: ModelSource | None, masks: dict[str, torch.Tensor],
                   config: LocateConfig, memorized: ActivationStats,
                   reference: ActivationStats) -> dict:
    from memedit import __version__

    stored = _hash_weights(pipe, source, list(masks))
    tensors = {
        key: {"shape": list(stored[key].shape), "dtype": str(stored[key].dtype).split(".")[-1],
              "sha256_before": tensor_sha256(stored[key]),
              "sha256_after": tensor_sha256(zero_masked(stored[key], masks[key]))}
        for key in masks
    }
    layers = {key: {"selected": int(m.sum()), "total": m.numel(),
                    "fraction": float(m.sum()) / m.numel()} for key, m in masks.items()}
    selected = sum(v["selected"] for v in layers.values())
    total = sum(v["total"] for v in layers.values())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memedit_version": __version__,
        "method": {
            "name": "wanda-contrast (Chavhan et al. 2024, ConceptPrune protocol)",
            "targets": {t: TARGET_KINDS[t].description for t in config.targets},
            "k": config.k, "tau": config.tau, "rho": config.rho,
            "granularity": config.granularity,
            "sampling": asdict(config.sampling),
            "scheduler": type(pipe.scheduler).__name__,
        },
        "model": {
            "spec": source.spec if source else None,
            "hub_id": source.hub_id if source else None,
            "path": str(source.path) if source else None,
            "tensors": tensors,
            # The UNet's other tensors (None for an in-memory pipeline: no files to hash).
            "identity": (model_identity(source.path, list(masks), source.allow_pickle)
                         if source else None),
        },
        "prompts": {"memorized": memorized.prompt_sets, "reference": reference.prompt_sets},
        "layers": layers,
        "total": {"selected": selected, "total": total,
                  "fraction": selected / total if total else 0.0},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }


def locate(pipe, memorized: PromptSet, reference: PromptSet | None = None,
           config: LocateConfig | None = None, source: ModelSource | None = None,
           progress: bool = True, allow_empty: bool = False,
           target: CalibrationConfig | None = None, ordinary: PromptSet | None = None,
           clip=None, hardening: HardenConfig | None = None) -> Subspace:
    """Find the memorization subspace of ``pipe``.

    ``reference`` defaults to the empty prompt (the authors' default). Since every prompt uses
    the same seed and statistics are normalised by prompt count, one empty prompt gives exactly
    the statistics of one empty prompt per memorized prompt, at a fraction of the cost.

    With ``target`` (see :mod:`memedit.calibration`), k is not ``config.k`` but the smallest
    k of ``target.ks`` whose edit copies at most ``target.target_rate`` on a validation part
    split off ``memorized``, within ``target.utility_budget`` on the ``ordinary`` prompts
    (scene utility, or the CLIP score with ``clip``); the curve goes into the manifest.

    With ``hardening`` (see :mod:`memedit.hardening`), the edit is grown in rounds by the
    weights that an embedding attack on the edited model leans on (``memorized`` need their
    training images); it cannot be combined with ``target``.
    """
    from memedit.calibration import calibrate, split_validation
    from memedit.hardening import harden

    if target is not None and hardening is not None:
        raise MemeditError("Calibrating k and hardening cannot be combined yet.",
                           "Choose --target-rate or --harden-rounds.")
    config = config or LocateConfig()
    reference = reference if reference is not None else empty_reference(1)
    validation = None
    if target is not None:
        if ordinary is None:
            raise MemeditError("Calibrating k needs ordinary prompts to measure its cost.",
                               "Pass ordinary prompts (--ordinary FILE).")
        memorized, validation = split_validation(memorized, target.validation_fraction)
    stats_mem = record_statistics(pipe, memorized, config, source, progress)
    stats_ref = record_statistics(pipe, reference, config, source, progress)
    if hardening is not None:
        return harden(pipe, memorized, stats_mem, stats_ref, config, hardening, source, progress)
    if validation is None:
        return select_subspace(pipe, stats_mem, stats_ref, config, source, allow_empty)
    return calibrate(pipe, stats_mem, stats_ref, validation, ordinary, config, target, source,
                     clip, progress)[0]
