"""memedit: locate the weights a diffusion model uses to reproduce its training images, and
delete them (Chavhan et al., "Memorized Images in Diffusion Models share a Subspace that can be
Located and Deleted", 2024).

    >>> import memedit
    >>> pipe, source = memedit.load_pipeline("path/to/stable-diffusion")
    >>> subspace = memedit.locate(pipe, memedit.read_prompts("memorized.jsonl"), source=source)
    >>> memedit.bake(source, subspace, "sanitized-model")  # the files pipe was loaded from
"""

from memedit.artifacts import VERSION as __version__
from memedit.baking import BakeResult, bake
from memedit.calibration import CalibrationConfig, calibrate
from memedit.compare import compare, compare_subspaces
from memedit.errors import MemeditError
from memedit.evaluation.api import AttackReport, EvaluationReport, attack, detect, evaluate, sweep
from memedit.evaluation.attack import AttackConfig
from memedit.generation import GenerateResult, generate
from memedit.inspection import inspect, verify_sanitized
from memedit.loading import load_pipeline, resolve_model
from memedit.locate import (
    LocateConfig,
    locate,
    locate_and_bake,
    record_statistics,
    select_subspace,
)
from memedit.prompts import PromptSet, empty_reference, read_prompts
from memedit.sampling import SamplingConfig
from memedit.statistics import ActivationStats, merge_stats
from memedit.subspace import Subspace, apply_subspace

__all__ = [
    "ActivationStats",
    "AttackConfig",
    "AttackReport",
    "BakeResult",
    "CalibrationConfig",
    "EvaluationReport",
    "GenerateResult",
    "LocateConfig",
    "MemeditError",
    "PromptSet",
    "SamplingConfig",
    "Subspace",
    "__version__",
    "apply_subspace",
    "attack",
    "bake",
    "calibrate",
    "compare",
    "compare_subspaces",
    "detect",
    "empty_reference",
    "evaluate",
    "generate",
    "inspect",
    "load_pipeline",
    "locate",
    "locate_and_bake",
    "merge_stats",
    "read_prompts",
    "record_statistics",
    "resolve_model",
    "select_subspace",
    "sweep",
    "verify_sanitized",
]
