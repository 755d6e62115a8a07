"""The Python API: export a pipeline to ONNX and prove it (parity + sanitization audit).

``export_onnx`` writes the folder atomically: export, ``onnx.checker``, audit and parity all
run on a temporary sibling, and only a folder that passed is moved into place. A sanitized
export that fails the audit, or any export that fails parity, leaves nothing behind and raises
:class:`VerificationFailed`, which carries the full report.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memedit.errors import MemeditError
from memedit.export.audit import AuditReport, audit_export
from memedit.export.onnx import (
    PROVENANCE_DIR,
    ExportInfo,
    ExportOptions,
    export_pipeline,
    read_record,
    write_record,
)
from memedit.export.parity import (
    Case,
    ParityInputs,
    ParityReport,
    Thresholds,
    ort_parity,
    torch_references,
)
from memedit.export.runtime import load_ort_pipeline

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


@dataclass
class VerifyReport:
    """Everything checked about one ONNX folder."""

    onnx_dir: str
    source: str
    parity: ParityReport | None = None
    audit: AuditReport | None = None
    audit_note: str = ""
    export: ExportInfo | None = None
    provider_reason: str = ""

    @property
    def passed(self) -> bool:
        parity_ok = self.parity is None or self.parity.passed
        audit_ok = self.audit is None or self.audit.passed
        return parity_ok and audit_ok

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "onnx_dir": self.onnx_dir,
            "source": self.source,
            "export": None if self.export is None else self.export.to_dict(),
            "provider_reason": self.provider_reason,
            "audit": None if self.audit is None else self.audit.to_dict(),
            "audit_note": self.audit_note,
            "parity": None if self.parity is None else self.parity.to_dict(),
        }

    def table(self) -> str:
        """A readable, multi-section report."""
        lines = [f"ONNX folder: {self.onnx_dir}", f"PyTorch reference: {self.source}"]
        if self.export is not None:
            e = self.export
            sizes = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in e.files.items())
            lines += [f"Export: {e.seconds:.1f} s (onnx.checker {e.checker_seconds:.1f} s), "
                      f"opset {e.opset or 'Optimum default'}, {'fp16' if e.fp16 else 'fp32'}, "
                      "dynamic batch/sequence/image axes",
                      f"Files: {sizes}", f"Optimum validation: {e.optimum_validation}"]
        if self.provider_reason:
            lines.append(f"Provider: {self.provider_reason}")
        lines.append("")
        lines.append(self.audit.table() if self.audit else f"Sanitization audit: {self.audit_note}")
        if self.parity is not None:
            lines += ["", self.parity.table()]
        lines += ["", "RESULT: " + ("PASSED" if self.passed else "FAILED")]
        return "\n".join(lines)


class VerificationFailed(MemeditError):
    """Parity or the sanitization audit failed; ``report`` says where."""

    def __init__(self, report: VerifyReport, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.report = report


def load_subspace(path: str | os.PathLike | None):
    """``Subspace.load`` on a subspace folder or a model folder carrying ``memedit/``, or None."""
    from memedit.subspace import MANIFEST_FILE, Subspace

    if path is None:
        return None
    path = Path(path)
    if (path / PROVENANCE_DIR / MANIFEST_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return Subspace.load(path)
    return None


def _torch_phase(pipe: DiffusionPipeline, onnx_dir: Path,
                 masks: dict[str, torch.Tensor] | None, inputs: ParityInputs, parity: bool,
                 full_pipeline: bool, source: str,
                 audit_note: str) -> tuple[VerifyReport, list[Case] | None, float]:
    """Everything that needs the PyTorch pipeline: the audit, then the parity references.

    The audit runs first: it is cheap, and a failed one makes parity moot.
    """
    report = VerifyReport(str(onnx_dir), source, audit_note=audit_note)
    if masks:
        report.audit = audit_export(masks, pipe, onnx_dir)
    if not (parity and report.passed):
        return report, None, 0.0
    start = time.perf_counter()
    cases = torch_references(pipe, inputs, full_pipeline)
    return report, cases, time.perf_counter() - start


def _ort_phase(report: VerifyReport, cases: list[Case] | None, torch_seconds: float,
               onnx_dir: Path, thresholds: Thresholds, provider: str,
               threads: int | None) -> VerifyReport:
    """Run the parity cases with Optimum's ORT pipeline (after PyTorch was freed)."""
    if cases is None:
        return report
    ort_pipe, choice = load_ort_pipeline(onnx_dir, provider, threads)
    report.provider_reason = f"{choice.label} ({choice.reason})"
    report.parity = ort_parity(ort_pipe, cases, thresholds, choice.provider, torch_seconds)
    return report


def verify_loaded(pipe: DiffusionPipeline, onnx_dir: Path,
                  masks: dict[str, torch.Tensor] | None = None,
                  thresholds: Thresholds | None = None,
                  inputs: ParityInputs | None = None, parity: bool = True,
                  full_pipeline: bool = True, provider: str = "cpu", threads: int | None = None,
                  source: str = "", audit_note: str = "") -> VerifyReport:
    """Audit (if ``masks``) and parity of ``onnx_dir`` against the loaded PyTorch ``pipe``."""
    report, cases, spent = _torch_phase(pipe, Path(onnx_dir), masks, inputs or ParityInputs(),
                                        parity, full_pipeline, source, audit_note)
    return _ort_phase(report, cases, spent, Path(onnx_dir), thresholds or Thresholds(),
                      provider, threads)


def failure(report: VerifyReport) -> VerificationFailed:
    """The error that explains why ``report`` failed (audit first, then parity)."""
    if report.audit is not None and not report.audit.passed:
        bad = [r.key for r in report.audit.results if not r.passed]
        return VerificationFailed(
            report, f"Sanitization audit failed for {len(bad)} tensor(s), e.g. {bad[0]}: the "
            "exported graph does not keep every zeroed weight at zero.",
            "Check that the model was baked with this subspace (`memedit bake`), and export "
            "without graph optimizations that fuse weights.")
    return VerificationFailed(
        report, "ONNX Runtime does not reproduce the PyTorch model within the thresholds.",
        "See the table; loosen --max-abs/--mean-abs/--min-psnr only if the differences are "
        "expected (e.g. fp16).")


def export_onnx(model: str | os.PathLike | None, out: str | os.PathLike,
                options: ExportOptions | None = None, overwrite: bool = False,
                subspace: str | os.PathLike | None = None, parity: bool = True,
                thresholds: Thresholds | None = None, inputs: ParityInputs | None = None,
                threads: int | None = None, allow_pickle: bool = False) -> VerifyReport:
    """Export ``model`` to ``out`` with Optimum, then audit and check parity.

    The subspace to audit is ``subspace`` if given, else the one a memedit-baked model
    carries in ``memedit/``; a model without one is exported without an audit (said so in the
    report). Raises :class:`VerificationFailed` (nothing written) when a check fails.
    """
    from memedit.loading import load_pipeline, resolve_model
    from memedit.outputs import atomic_output_dir, check_output

    options = options or ExportOptions()
    source = resolve_model(model, allow_pickle)
    check_output(out, overwrite, [source.path, subspace])  # fail before the slow part
    explicit = load_subspace(subspace) if subspace is not None else None
    if subspace is not None and explicit is None:
        raise MemeditError(f"{subspace} holds no memedit subspace.",
                           "Pass the folder written by `memedit locate`, or a baked model.")
    carried = explicit or load_subspace(source.path)
    note = "" if carried else ("not run: the model carries no memedit subspace (not sanitized "
                               "by memedit); pass --subspace DIR to audit against one")
    dtype = "float16" if options.fp16 else "float32"
    from memedit.export.onnx import export_device

    pipe, _ = load_pipeline(source.path, export_device(options), dtype, allow_pickle)
    with atomic_output_dir(out, overwrite, [source.path, subspace], "onnx-export") as tmp:
        info = export_pipeline(pipe, tmp, options)
        if carried is not None:
            carried.write_into(tmp / PROVENANCE_DIR)  # so that verify-onnx can audit later
        report, cases, spent = _torch_phase(pipe, tmp, carried.masks if carried else None,
                                            inputs or ParityInputs(), parity, True,
                                            str(source.path), note)
        del pipe  # free PyTorch before ONNX Runtime loads (the full SD pipeline needs it)
        gc.collect()
        _ort_phase(report, cases, spent, tmp, thresholds or Thresholds(),
                   "auto" if options.fp16 else "cpu", threads)
        report.export = info
        report.onnx_dir = str(Path(out).expanduser().resolve())
        if not report.passed:
            raise failure(report)
        write_record(tmp, {"source": {"spec": source.spec, "path": str(source.path),
                                      "hub_id": source.hub_id},
                           "subspace": str(subspace) if subspace else (
                               "carried by the model" if carried else None)}
                     | {"report": report.to_dict()})
    return report


def verify_onnx(onnx_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                subspace: str | os.PathLike | None = None, thresholds: Thresholds | None = None,
                inputs: ParityInputs | None = None, parity: bool = True,
                provider: str = "auto", threads: int | None = None,
                allow_pickle: bool = False) -> VerifyReport:
    """Re-check an exported folder against its PyTorch model (parity and audit).

    ``model`` defaults to the source recorded at export; the subspace to ``subspace``, else
    the copy the export stored in ``memedit/``, else the one the model carries.
    """
    from memedit.loading import load_pipeline

    onnx_dir = Path(onnx_dir).expanduser().resolve()
    if not (onnx_dir / "model_index.json").is_file():
        raise MemeditError(f"{onnx_dir} is not an ONNX pipeline folder.",
                           "Pass the folder written by `memedit export --onnx`.")
    if model is None:
        model = read_record(onnx_dir).get("source", {}).get("path")
        if model is None:
            raise MemeditError(f"{onnx_dir} does not record its PyTorch source model.",
                               "Pass --model with the pipeline folder that was exported.")
    pipe, source = load_pipeline(model, "cpu", "float32", allow_pickle)
    chosen = (load_subspace(subspace) if subspace is not None
              else load_subspace(onnx_dir) or load_subspace(source.path))
    if subspace is not None and chosen is None:
        raise MemeditError(f"{subspace} holds no memedit subspace.",
                           "Pass the folder written by `memedit locate`, or a baked model.")
    note = "" if chosen else "not run: no subspace found (pass --subspace DIR)"
    report, cases, spent = _torch_phase(pipe, onnx_dir, chosen.masks if chosen else None,
                                        inputs or ParityInputs(), parity, True,
                                        str(source.path), note)
    del pipe  # free PyTorch before ONNX Runtime loads
    gc.collect()
    return _ort_phase(report, cases, spent, onnx_dir, thresholds or Thresholds(), provider,
                      threads)
