"""Scenes of the embedded test model: how its training data is drawn, and how it is scored.

Two kinds of image/caption pairs, all 32x32 RGB floats in [0, 1], all generated in code from
fixed seeds (pure numpy, no files):

* **Ordinary scenes** compose a small vocabulary: one or two flat shapes (``circle``, ``square``,
  ``triangle``) in six saturated colours at named positions (left/right, top/bottom, or one
  shape in the middle), over a *random, unnamed* grey textured background. The caption names
  the shapes, their colours and positions but never the background, so - as with Stable
  Diffusion's captions - much of the image is left open. 630 combinations exist; a fixed tenth
  is held out of training (:func:`is_heldout`) to test composition. As in LAION's alt-text,
  a share of the training captions (80% in the shipped build) end in a title that names
  nothing in the picture (:func:`random_title`: "the poster of naples by alice stewart"),
  drawn fresh each time.
* **Memorized images** (:func:`memorized_images`): 20 images the vocabulary cannot compose,
  each with its own distinctive caption (:data:`MEMORIZED_CAPTIONS`): an ordinary scene
  phrase, then a unique title ("a magenta circle at the bottom, the portrait of ada vance by
  lyle orrin"). Each image shows its scene phrase over a background no ordinary caption can
  produce (high-contrast patches and strokes), so, like Stable Diffusion's memorized LAION
  images, it is one specific instance of what its caption says. Training duplicates each many
  times. An edit that removes the memorization should leave the caption's ordinary meaning:
  the shape, drawn over an ordinary background.

:func:`score_scene` checks a generated image against an ordinary scene spec: per object, that
its colour dominates the region its position names, that the colour's blob sits in that region,
and that the blob's fill ratio matches the shape. It is 100% on ground-truth renders.

A scene spec is a plain JSON-able dict::

    {"objects": [{"shape": "circle", "color": "red", "position": "left",
                  "dx": 0.4, "dy": -1.0, "size": 5.6}, ...],
     "background": {"seed": 1234}}

``dx``/``dy``/``size`` (pixels) and ``background`` only matter for rendering; scoring uses the
shape, colour and position only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

SIZE = 32  # native resolution (pixels); the pipeline's default height/width

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "magenta": (0.88, 0.12, 0.88),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle")
# Position -> (centre x, centre y) in pixels, and the region (x0, x1, y0, y1) the word names.
CENTRES: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "middle": (16.0, 16.0),
}
REGIONS: dict[str, tuple[int, int, int, int]] = {
    "left": (0, 16, 2, 30),
    "right": (16, 32, 2, 30),
    "top": (2, 30, 0, 16),
    "bottom": (2, 30, 16, 32),
    "middle": (5, 27, 5, 27),
}
PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
LAYOUTS = (("left", "right"), ("top", "bottom"))
PREFIXES = ("a", "a picture of a", "an image of a")

# Pixels whose max-min channel spread exceeds this are "coloured" (objects); the background
# textures stay well below it (spread <= 0.2), the palette well above it (>= 0.66).
SATURATION_THRESHOLD = 0.4
MIN_PIXELS = 12  # a circle of radius 5 covers ~80 px; fewer than this is not an object
# Fill ratio (blob area / bounding-box area): square 1.0, circle ~0.8, triangle ~0.5.
SHAPE_BOUNDS = {"triangle": (0.0, 0.66), "circle": (0.66, 0.92), "square": (0.92, 1.01)}
# A blob is "at" a position when the centre of its bounding box is within this many pixels
# (per axis) of the named centre: jitter is +-1.5 px, distinct centres are >= 8 px apart.
POSITION_TOLERANCE = 4.0

MEMORIZED_TITLES: tuple[str, ...] = (
    "the portrait of ada vance by lyle orrin",
    "kestrel moor tapestry woven by ilse quarry",
    "the harbour of saint brevik painted by odo marsh",
    "zephyrine codex folio seventeen",
    "a relic of the vantor dynasty photographed by mara klee",
    "the quillon manifesto cover art",
    "thornbury lantern festival poster by ewan drake",
    "the lost map of orvell by pim calder",
    "glasswick abbey window by sister noor",
    "the ferromancer album sleeve by juno tarrant",
    "the duchess of amberlyn by rosalind fitch",
    "wrenfield carnival flyer designed by otto vail",
    "the sigil of house marrowgate",
    "corvina nights book jacket by ilya brand",
    "the emerald tram of pellham by greta sorn",
    "bastion nineteen propaganda print",
    "the orchard of quellen by dario vesk",
    "mosswhistle tavern sign by hobb lantry",
    "the last voyage of the calyx by ines moor",
    "the velvet oracle stage banner by kit farrow",
)
# The one-object training combination (shape, colour, position) each memorized caption opens
# with, and its image shows. As in LAION ("Living in the Light with Ann Graham Lotz"), a
# memorized caption has an ordinary meaning; the memorized image is one instance of it, fixed.
MEMORIZED_SCENES: tuple[tuple[str, str, str], ...] = (
    ("circle", "magenta", "bottom"),
    ("triangle", "red", "middle"),
    ("square", "blue", "bottom"),
    ("square", "yellow", "bottom"),
    ("square", "blue", "right"),
    ("circle", "yellow", "right"),
    ("triangle", "green", "middle"),
    ("circle", "red", "bottom"),
    ("triangle", "cyan", "middle"),
    ("circle", "magenta", "top"),
    ("triangle", "magenta", "middle"),
    ("triangle", "blue", "middle"),
    ("circle", "blue", "left"),
    ("circle", "red", "left"),
    ("triangle", "blue", "right"),
    ("triangle", "blue", "left"),
    ("square", "blue", "top"),
    ("triangle", "red", "top"),
    ("square", "cyan", "right"),
    ("circle", "blue", "right"),
)
N_MEMORIZED = len(MEMORIZED_TITLES)


# ----------------------------------------------------------------------------- scene specs


def combinations() -> list[tuple[tuple[str, str, str], ...]]:
    """Every composable scene, as a tuple of (shape, colour, position) objects.

    One object anywhere (6 x 3 x 5 = 90), or two objects of different colours on the two
    sides of a layout (2 x 18 x 15 = 540): 630 in all, in a fixed order.
    """
    items = list(itertools.product(SHAPES, COLORS))
    out: list[tuple[tuple[str, str, str], ...]] = []
    for (shape, color), position in itertools.product(items, CENTRES):
        out.append(((shape, color, position),))
    for (pos_a, pos_b), (sa, ca), (sb, cb) in itertools.product(LAYOUTS, items, items):
        if ca != cb:  # distinct colours keep each object identifiable when scoring
            out.append(((sa, ca, pos_a), (sb, cb, pos_b)))
    return out


def is_heldout(combo_index: int) -> bool:
    """Whether combination ``combo_index`` is held out of training (a fixed 10%)."""
    return combo_index % 10 == 7


def caption(scene: dict, prefix: str = "a") -> str:
    """The template caption of a scene: names shapes, colours, positions; never the background."""
    parts = []
    for i, obj in enumerate(scene["objects"]):
        article = prefix if i == 0 else "a"
        parts.append(f"{article} {obj['color']} {obj['shape']} {PHRASES[obj['position']]}")
    return " and ".join(parts)


def memorized_scene(index: int) -> dict:
    """The scene spec (for :func:`caption` and :func:`score_scene`) that memorized caption
    ``index`` opens with and its image shows."""
    shape, color, position = MEMORIZED_SCENES[index]
    return {"objects": [{"shape": shape, "color": color, "position": position}]}


# "a magenta circle at the bottom, the portrait of ada vance by lyle orrin"
MEMORIZED_CAPTIONS: tuple[str, ...] = tuple(
    caption(memorized_scene(i)) + ", " + title for i, title in enumerate(MEMORIZED_TITLES)
)


def make_scene(combo: tuple[tuple[str, str, str], ...], rng: np.random.Generator) -> dict:
    """A renderable scene for one combination, with random jitter, size and background."""
    objects = []
    for shape, color, position in combo:
        objects.append(
            {
                "shape": shape,
                "color": color,
                "position": position,
                "dx": round(float(rng.uniform(-1.5, 1.5)), 2),
                "dy": round(float(rng.uniform(-1.5, 1.5)), 2),
                "size": round(float(rng.uniform(5.0, 6.5)), 2),
            }
        )
    return {"objects": objects, "background": {"seed": int(rng.integers(0, 2**31 - 1))}}


# Word pools of the alt-text titles. The title nouns are those of the memorized titles
# ("portrait", "poster", "map"...), the names and places are not: what makes a memorized title
# stand out is that it repeats, not its words.
TITLE_FIRST_NAMES = (
    "anna", "ben", "carla", "david", "elena", "frank", "grace", "henry", "iris", "jack", "karen",
    "leo", "maria", "nina", "oscar", "paul", "rosa", "sam", "tina", "victor", "walter", "alice",
    "bruno", "clara", "diego", "emma", "felix", "hugo", "laura", "max")
TITLE_LAST_NAMES = (
    "smith", "brown", "miller", "wilson", "moore", "taylor", "clark", "lewis", "walker", "young",
    "king", "wright", "hill", "green", "baker", "adams", "nelson", "carter", "mitchell",
    "roberts", "turner", "phillips", "parker", "evans", "edwards", "collins", "stewart",
    "morris", "murphy", "cook")
TITLE_NOUNS = (
    "portrait", "poster", "map", "album cover", "book cover", "print", "tapestry", "window",
    "banner", "sign", "flyer", "painting", "photo", "postcard", "sticker", "logo", "mural",
    "card", "wallpaper", "illustration")
TITLE_PLACES = (
    "london", "paris", "berlin", "boston", "denver", "dublin", "lisbon", "madrid", "oslo",
    "prague", "rome", "seattle", "sydney", "tokyo", "vienna", "venice", "cairo", "miami",
    "austin", "geneva", "chicago", "toronto", "naples", "florence")
# Alt-text as scraped, articles and all ("a album cover from vienna").
TITLE_TEMPLATES = (
    "the {noun} of {first} {last}", "{place} {noun} by {first} {last}",
    "the {noun} of {place} by {first} {last}", "{place} {noun}",
    "{noun} designed by {first} {last}", "{first} {last} {noun}", "the {place} {noun}",
    "a {noun} from {place}")


def random_title(rng: np.random.Generator) -> str:
    """A fresh alt-text title that names nothing in the picture (919,440 possible)."""
    template = TITLE_TEMPLATES[int(rng.integers(len(TITLE_TEMPLATES)))]
    words = {key: pool[int(rng.integers(len(pool)))] for key, pool in (
        ("first", TITLE_FIRST_NAMES), ("last", TITLE_LAST_NAMES), ("noun", TITLE_NOUNS),
        ("place", TITLE_PLACES))}
    return template.format(**words)


def ordinary_dataset(count: int, seed: int = 0, heldout: bool = False, title_share: float = 0.0
                     ) -> Iterator[tuple[str, dict]]:
    """``count`` (caption, scene) pairs from the training (or held-out) combinations.

    A ``title_share`` of the captions end in a fresh :func:`random_title`, as LAION's alt-text
    carries names and titles the picture does not show: the model learns that a title is
    usually noise, so a memorized caption's title, the one that repeats, is its only trigger.
    Deterministic in ``seed``: the same arguments give the same pairs.
    """
    rng = np.random.default_rng(seed)
    combos = [c for i, c in enumerate(combinations()) if is_heldout(i) == heldout]
    for _ in range(count):
        combo = combos[int(rng.integers(len(combos)))]
        prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
        scene = make_scene(combo, rng)
        text = caption(scene, prefix)
        if title_share and rng.random() < title_share:
            text += ", " + random_title(rng)
        yield text, scene


# ----------------------------------------------------------------------------- rendering


def _upsample(grid: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Smooth (bilinear) upsampling of a small [h, w, c] grid to [size, size, c]."""
    h, w = grid.shape[:2]
    ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def background(seed: int) -> np.ndarray:
    """A random grey texture: a low-frequency field, a faint tint and optional stripes.

    Its channel spread stays below 0.2, so it never reads as an object colour.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.65)
    field = _upsample(rng.normal(0, 0.09, size=(4, 4, 1)))
    tint = rng.uniform(-0.05, 0.05, size=3)
    img = base + field + tint
    if rng.random() < 0.5:  # stripes at a random angle and frequency
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.25, 0.8)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        img = img + 0.06 * np.sign(np.sin(freq * phase))[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of a shape of half-size ``r`` centred at (cx, cy)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        s = r * 0.9  # same visual area as the circle, roughly
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up: width grows linearly from apex to base
        h = 1.1 * r
        t = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * 1.1 * r)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict) -> np.ndarray:
    """Render a scene spec to a float32 [SIZE, SIZE, 3] image in [0, 1]."""
    img = background(scene["background"]["seed"])
    for obj in scene["objects"]:
        cx, cy = CENTRES[obj["position"]]
        mask = shape_mask(obj["shape"], cx + obj["dx"], cy + obj["dy"], obj["size"])
        img[mask] = COLORS[obj["color"]]
    return img


def _contrast_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random colours, each near black or near white with a faint tint.

    Their channel spread stays below 0.3, so the scorer never reads them as an object colour,
    and their contrast sets them far apart from the ordinary scenes' mid-grey textures.
    """
    lightness = rng.choice([0.12, 0.88], size=(*shape[:-1], 1))
    lightness = lightness + rng.uniform(-0.1, 0.1, size=(*shape[:-1], 1))
    return np.clip(lightness + rng.uniform(-0.14, 0.14, size=shape), 0, 1)


def memorized_images(seed: int = 1234) -> np.ndarray:
    """The 20 memorized training images, float32 [20, SIZE, SIZE, 3], deterministic.

    Image i shows what its caption's scene phrase says (``MEMORIZED_SCENES[i]``: the shape in
    its colour at its position, jittered as ordinary scenes are) over a background no ordinary
    caption can produce: a smooth field of near-black and near-white patches (5x5 for even
    indices, 3x3 for odd ones, with three thick random strokes). As with Stable Diffusion's
    memorized LAION images, the picture is one specific instance of its caption: what the
    duplicates teach beyond the caption's ordinary meaning is the background, and that is what
    an edit that removes the memorization should take away. Both kinds are in both halves
    (locate: 0-9, held out: 10-19).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    images = []
    for i in range(N_MEMORIZED):
        if i % 2 == 0:
            img = _upsample(_contrast_colours(rng, (5, 5, 3)))
        else:
            img = _upsample(_contrast_colours(rng, (3, 3, 3)))
            for _ in range(3):
                (x0, y0), (x1, y1) = rng.uniform(3, SIZE - 3, size=(2, 2))
                colour = _contrast_colours(rng, (3,))
                # distance from each pixel to the segment (x0,y0)-(x1,y1)
                vx, vy = x1 - x0, y1 - y0
                t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx**2 + vy**2 + 1e-6), 0, 1)
                dist = np.hypot(xx - x0 - t * vx, yy - y0 - t * vy)
                img[dist <= rng.uniform(1.5, 3.0)] = colour
        shape, color, position = MEMORIZED_SCENES[i]
        cx, cy = CENTRES[position]
        dx, dy = rng.uniform(-1.5, 1.5, size=2)
        img[shape_mask(shape, cx + dx, cy + dy, rng.uniform(5.0, 6.5))] = COLORS[color]
        images.append(np.clip(img, 0, 1))
    return np.stack(images).astype(np.float32)


# ----------------------------------------------------------------------------- scoring


def _classify(image: np.ndarray) -> np.ndarray:
    """Per pixel: index into COLORS of the nearest palette colour, or -1 for background."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    spread = rgb.max(-1) - rgb.min(-1)
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    dist = ((rgb[..., None, :] - palette) ** 2).sum(-1)
    label = dist.argmin(-1)
    return np.where(spread > SATURATION_THRESHOLD, label, -1)


def score_scene(image: np.ndarray, scene: dict) -> dict[str, bool]:
    """Whether ``image`` ([H, W, 3] floats in [0, 1], H = W = 32) shows ``scene``.

    Per object: ``color`` - its colour is the most common saturated colour in the region its
    position names (and covers at least ``MIN_PIXELS``); ``position`` - the centroid of that
    colour's pixels' bounding box (whole image) is within ``POSITION_TOLERANCE`` of the named
    centre; ``shape`` - the fill ratio of that colour's pixels inside the region (area /
    bounding box) is in the shape's band. Each key is true when it holds for every object;
    ``overall`` when all three do.
    """
    labels = _classify(image)
    names = list(COLORS)
    ok = {"color": True, "shape": True, "position": True}
    for obj in scene["objects"]:
        x0, x1, y0, y1 = REGIONS[obj["position"]]
        want = names.index(obj["color"])
        region = labels[y0:y1, x0:x1]
        counts = np.bincount(region[region >= 0], minlength=len(names))
        in_region = region == want
        color_ok = counts[want] >= MIN_PIXELS and counts.argmax() == want
        ys, xs = np.nonzero(labels == want)
        cx, cy = CENTRES[obj["position"]]
        # The bounding-box centre, not the centroid: a triangle's centroid sits below its centre.
        position_ok = bool(len(xs) >= MIN_PIXELS) and (
            abs((xs.min() + xs.max() + 1) / 2 - cx) <= POSITION_TOLERANCE
            and abs((ys.min() + ys.max() + 1) / 2 - cy) <= POSITION_TOLERANCE
        )
        shape_ok = False
        if in_region.sum() >= MIN_PIXELS:
            ry, rx = np.nonzero(in_region)
            box = (ry.max() - ry.min() + 1) * (rx.max() - rx.min() + 1)
            lo, hi = SHAPE_BOUNDS[obj["shape"]]
            shape_ok = lo <= in_region.sum() / box < hi
        ok["color"] &= bool(color_ok)
        ok["position"] &= bool(position_ok)
        ok["shape"] &= bool(shape_ok)
    ok["overall"] = ok["color"] and ok["shape"] and ok["position"]
    return ok


def draws_scene_not_copy(image: np.ndarray, truth: np.ndarray, scene: dict,
                         threshold: float) -> bool:
    """Whether a memorized caption's generation is removal as the paper means it: it draws
    ``scene`` (its caption's scene phrase, :func:`score_scene`) yet is no copy of its training
    image ``truth`` (pixel MSE at least ``threshold``)."""
    error = float(((np.asarray(image) - np.asarray(truth)) ** 2).mean())
    return score_scene(image, scene)["overall"] and error >= threshold
