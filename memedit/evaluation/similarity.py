"""How close a generation is to its training image(s): pure functions plus the SSCD loader.

Three measures, all on float images ``[H, W, 3]`` in ``[0, 1]``:

- ``sscd``: cosine similarity of SSCD copy-detection descriptors (Pizzi et al. 2022), the
  field's measure (Somepalli 0.5 "replication", Wen/NeMo 0.7 "memorized"). Needs the
  authors' TorchScript file, so it is used only when the user passes one.
- ``mse``: mean squared pixel error after resizing the training image to the generation's
  size. The built-in default because it needs no downloaded weights and matches how
  memorization shows in verbatim copies (Carlini et al. 2023 extract training images with a
  pixel L2 distance). Threshold 0.01 comes from the embedded test model: the closest two
  distinct training images are 0.097 apart, a fresh drawing of a memorized caption's scene
  0.048 from its training image, while VAE reconstruction alone costs 0.001.
  It under-counts "template" copies (same layout, other details); state the measure with
  every number.
- ``ssim``: structural similarity (torchmetrics), reported alongside as a second opinion that
  is less sensitive to global colour shifts than MSE; no threshold is implied for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memedit.errors import MemeditError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSCD_SMALL_EDGE = 288


@dataclass(frozen=True)
class Measure:
    """A similarity measure and the direction in which "more similar" lies."""

    name: str
    higher_is_similar: bool
    default_thresholds: tuple[float, ...]
    description: str

    @property
    def symbol(self) -> str:
        """The comparison that reads "memorized": ``score > threshold`` or ``score <
        threshold``."""
        return ">" if self.higher_is_similar else "<"

    @property
    def sign(self) -> float:
        """+1 or -1: ``sign * score`` grows towards "copy"."""
        return 1.0 if self.higher_is_similar else -1.0

    def is_memorized(self, value: float | np.ndarray,
                     threshold: float) -> bool | np.ndarray:
        """Whether a score (or each of an array's) crosses ``threshold`` towards "copy"
        (strict, as in the papers)."""
        return value > threshold if self.higher_is_similar else value < threshold

    def most_similar(self, values: np.ndarray) -> float:
        return float(values.max() if self.higher_is_similar else values.min())


MEASURES = {
    "sscd": Measure("sscd", True, (0.7, 0.5),
                    "cosine similarity of L2-normalised SSCD descriptors (resize small edge "
                    "288, ImageNet mean/std)"),
    "mse": Measure("mse", False, (0.01,),
                   "mean squared error of [0,1] pixels, training image resized to the "
                   "generation (bicubic)"),
    "ssim": Measure("ssim", True, (),
                    "structural similarity (torchmetrics, Gaussian 11x11, sigma 1.5, "
                    "data range 1), training image resized to the generation"),
}


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 ``[H, W, 3]`` in ``[0, 1]`` (RGB; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise MemeditError(f"Training image {path} does not exist.",
                           "Image paths in a prompt file are relative to the prompt file; "
                           "check the `image` field of that prompt.")
    if path.is_dir():
        raise MemeditError(f"Training image {path} is a folder.", "Name one image file.")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MemeditError(f"Cannot read the image {path}: {err}",
                           "Use a PNG or JPEG file; re-save it if it is truncated.") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def to_pil(image: np.ndarray):
    """A ``[H, W, 3]`` float image in ``[0, 1]`` as an 8-bit PIL image."""
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize (PIL, antialiased when shrinking) of a float image; no-op if same size."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    # Resize each channel in float mode so no 8-bit rounding is added to the comparison.
    channels = [Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                .resize((width, height), Image.Resampling.BICUBIC) for c in range(3)]
    return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected two [H, W, 3] images of one shape, got {a.shape}, {b.shape}")


def pixel_mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference of two same-size ``[0, 1]`` images (0 = identical)."""
    _check_pair(a, b)
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two same-size ``[0, 1]`` images (1 = identical)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    # The 11-pixel window of the usual setting does not fit very small images; shrink it to
    # the largest odd size that does.
    kernel = min(11, *(s - 1 + s % 2 for s in a.shape[:2]))
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
              .permute(2, 0, 1)[None] for x in (a, b))
    return float(structural_similarity_index_measure(
        ta, tb, data_range=1.0, kernel_size=kernel, sigma=1.5 * kernel / 11))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two descriptor arrays ``[N, D]`` (or one row vs many)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=-1)


def sscd_preprocess(image: np.ndarray) -> torch.Tensor:
    """The SSCD authors' evaluation transform: resize the small edge to 288 (bilinear,
    antialiased), then ImageNet mean/std normalisation; returns ``[3, H', W']``."""
    height, width = image.shape[:2]
    scale = SSCD_SMALL_EDGE / min(height, width)
    size = (round(height * scale), round(width * scale))
    pil = to_pil(image)
    from PIL import Image

    resized = np.asarray(pil.resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float32)
    tensor = torch.from_numpy(resized / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


class SSCD:
    """An SSCD TorchScript model (``sscd_disc_large.torchscript.pt`` or ``..._mixup``)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise MemeditError(f"SSCD model {path} does not exist.",
                               "Download sscd_disc_mixup.torchscript.pt from "
                               "github.com/facebookresearch/sscd-copy-detection and pass its "
                               "path, or drop --sscd to use the built-in pixel measure.")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MemeditError(f"{path} is not a TorchScript file ({first}).",
                               "Pass the *.torchscript.pt file of SSCD, not a state_dict "
                               "checkpoint.") from None
        self.path = path
        self.device = torch.device(device)

    @torch.no_grad()
    def descriptors(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised descriptors ``[N, D]``; one image a forward call, because images of
        other aspect ratios resize to other shapes."""
        out = []
        for image in images:
            batch = sscd_preprocess(image)[None].to(self.device)
            desc = self.model(batch).float().reshape(1, -1)
            out.append(torch.nn.functional.normalize(desc, dim=-1).cpu().numpy()[0])
        return np.stack(out)


def aggregate_ground_truths(values: Sequence[float], measure: Measure, how: str) -> float:
    """One score per generation from its scores against several training images.

    ``max``: the most similar training image (the largest similarity, the smallest distance);
    ``mean``: the average over them.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no ground-truth score to aggregate")
    if how == "mean":
        return float(values.mean())
    if how == "max":
        return measure.most_similar(values)
    raise ValueError(f"unknown ground-truth aggregation {how!r}")


class Scorer:
    """Scores generations against training images with one measure, caching the training
    images (and their SSCD descriptors) across model variants."""

    def __init__(self, measure: str = "mse", sscd: SSCD | None = None) -> None:
        if measure not in MEASURES:
            raise MemeditError(f"Unknown similarity measure {measure!r}.",
                               f"Use one of {', '.join(MEASURES)}.")
        if measure == "sscd" and sscd is None:
            raise MemeditError("The sscd measure needs the SSCD model.", "Pass --sscd PATH.")
        self.measure = MEASURES[measure]
        self.sscd = sscd
        self._images: dict[Path, np.ndarray] = {}
        self._descriptors: dict[Path, np.ndarray] = {}

    def training_image(self, path: Path) -> np.ndarray:
        if path not in self._images:
            self._images[path] = load_image(path)
        return self._images[path]

    def check_readable(self, paths: Sequence[Path]) -> None:
        """Read every training image once, up front, so a bad file fails before sampling."""
        for path in paths:
            self.training_image(path)

    def scores(self, generation: np.ndarray, paths: Sequence[Path]) -> list[float]:
        """The score of one generation against each of its training images."""
        if self.measure.name == "sscd":
            for path in paths:
                if path not in self._descriptors:
                    self._descriptors[path] = self.sscd.descriptors(
                        [self.training_image(path)])[0]
            gen = self.sscd.descriptors([generation])[0]
            return [float(cosine_similarity(gen, self._descriptors[p])[0]) for p in paths]
        fn = pixel_mse if self.measure.name == "mse" else ssim
        h, w = generation.shape[:2]
        return [fn(generation, resize(self.training_image(p), h, w)) for p in paths]
