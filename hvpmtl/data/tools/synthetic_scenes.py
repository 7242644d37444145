"""The synthetic scenes, drawn (no file written here): 1-4 objects on a grey-noise background, one per cell of
a 3x2 grid (so none overlap), or one object filling the frame. An object has a shape, a colour and a texture;
its labels are those three leaves plus their ancestors in a small hierarchy (shape families, colour groups,
"patterned"), as Tencent's labels include ancestors. Scenes with 4 objects are also "crowded scene". Leaf
confidences mix 1.0 with 0.9 and 0.8, an ancestor gets its best child's. The data set: synthetic.py.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from hvpmtl.data.formats.dictionary import Dictionary

# (name, parent name or None); the index is the position.
CLASSES = [
    ("round shape", None), ("circle", "round shape"), ("ring", "round shape"),
    ("polygon", None), ("square", "polygon"), ("triangle", "polygon"), ("hexagon", "polygon"),
    ("diamond", "polygon"),
    ("spiky shape", None), ("star", "spiky shape"), ("cross", "spiky shape"),
    ("warm colour", None), ("red", "warm colour"), ("orange", "warm colour"), ("yellow", "warm colour"),
    ("cool colour", None), ("blue", "cool colour"), ("green", "cool colour"), ("purple", "cool colour"),
    ("patterned", None), ("striped", "patterned"), ("dotted", "patterned"), ("plain", None),
    ("crowded scene", None),
]
SHAPES = ["circle", "ring", "square", "triangle", "hexagon", "diamond", "star", "cross"]
COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 230, 40),
           "blue": (30, 60, 220), "green": (30, 170, 50), "purple": (140, 40, 190)}
TEXTURES = ["plain", "striped", "dotted"]
CONFS = ([1.0, 0.9, 0.8], [0.6, 0.25, 0.15])  # values, probabilities
GRID = (3, 2)  # cells across, down
MAX_OBJECTS = 4
CROWDED = 4


def dictionary() -> Dictionary:
    index = {name: i for i, (name, _) in enumerate(CLASSES)}
    parents = np.array([index[p] if p else -1 for _, p in CLASSES], np.int64)
    return Dictionary([f"syn{i:05d}" for i in range(len(CLASSES))], [n for n, _ in CLASSES], parents)


def _polygon(shape: str, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices around (0, 0) with circumradius r, turned by angle (radians)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif shape == "diamond":  # a tall rhombus: a turned square is never this narrow
        pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    elif shape == "star":
        pts = [(rr * math.cos(a), rr * math.sin(a))
               for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2) for rr in [(1.0, 0.42)[k % 2]]]
    elif shape == "cross":
        w = 0.33
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w), (-w, -1)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(r * (x * c - y * s), r * (x * s + y * c)) for x, y in pts]


def _shape_mask(shape: str, r: float, angle: float, size: int) -> np.ndarray:
    """Boolean mask of the shape centred in a size x size box."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    c = size / 2
    if shape in ("circle", "ring"):
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        if shape == "ring":
            ri = 0.55 * r
            d.ellipse([c - ri, c - ri, c + ri, c + ri], fill=0)
    else:
        d.polygon([(c + x, c + y) for x, y in _polygon(shape, r, angle)], fill=255)
    return np.asarray(im) > 127


def render_scene(rng: np.random.Generator, single: bool = False, colour: str | None = None,
                 texture: str | None = None) -> tuple[np.ndarray, list[dict]]:
    """An RGB uint8 image and its objects (shape, colour, texture, centre, radius, anchor);
    render_scene_with_masks without the masks."""
    img, objects, _ = render_scene_with_masks(rng, single, colour, texture)
    return img, objects


def render_scene_with_masks(rng: np.random.Generator, single: bool = False, colour: str | None = None,
                            texture: str | None = None) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """An RGB uint8 image, its objects (shape, colour, texture, centre, radius, anchor) and their drawn masks
    ((num_objects, h, w) bool, in the objects' order: the pixels each object painted; none overlap).

    single: one object filling most of the image (an object-centric photo, ImageNet-like) instead of 1-4
    objects in the cells of a 3x2 grid. colour, texture: given instead of drawn (every object gets them).

    The anchor is a pixel that shows the object's own colour (for rings the middle of the band),
    with the texture laid out so that a band of base colour runs through it.
    """
    w = int(rng.integers(160, 257))
    h = int(rng.integers(120, 193))
    grey = rng.integers(70, 186, (h, w, 1), dtype=np.int16)
    img = np.clip(grey + rng.integers(-10, 11, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
    grid = (1, 1) if single else GRID
    n = 1 if single else int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(grid[0] * grid[1], size=n, replace=False)
    cw, ch = w / grid[0], h / grid[1]
    objects, masks = [], np.zeros((n, h, w), bool)
    for k, cell in enumerate(cells):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        obj_colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
        obj_texture = texture or TEXTURES[int(rng.integers(len(TEXTURES)))]
        r = float(rng.uniform(0.32, 0.46)) * min(cw, ch)
        room_x, room_y = cw / 2 - r, ch / 2 - r
        cx = (cell % grid[0] + 0.5) * cw + float(rng.uniform(-room_x, room_x))
        cy = (cell // grid[0] + 0.5) * ch + float(rng.uniform(-room_y, room_y))
        angle = float(rng.uniform(-0.35, 0.35))
        box = int(2 * r) + 3
        mask = _shape_mask(shape, r, angle, box)
        x0, y0 = int(round(cx - box / 2)), int(round(cy - box / 2))
        # clip the box to the image (objects stay in their cell, this only guards rounding)
        sx0, sy0 = max(0, -x0), max(0, -y0)
        ex, ey = min(box, w - x0), min(box, h - y0)
        mask = mask[sy0:ey, sx0:ex]
        ax, ay = (cx + 0.775 * r, cy) if shape == "ring" else (cx, cy)
        ys, xs = np.mgrid[y0 + sy0:y0 + ey, x0 + sx0:x0 + ex]
        base = np.array(COLOURS[obj_colour], np.float32)
        dark = np.zeros(mask.shape, bool)
        if obj_texture == "striped":
            period, t = 8.0, float(rng.uniform(0, math.pi))
            proj = (xs - ax) * math.cos(t) + (ys - ay) * math.sin(t) + period / 4
            dark = np.mod(proj, period) >= period / 2
        elif obj_texture == "dotted":
            period = 7.0
            dx = np.mod(xs - ax + period / 2, period) - period / 2
            dy = np.mod(ys - ay + period / 2, period) - period / 2
            dark = (np.abs(np.abs(dx) - period / 2) ** 2 + np.abs(np.abs(dy) - period / 2) ** 2) < 2.2 ** 2
        pix = np.where(dark[..., None], base * 0.35, base).astype(np.uint8)
        region = img[y0 + sy0:y0 + ey, x0 + sx0:x0 + ex]
        region[mask] = pix[mask]
        masks[k, y0 + sy0:y0 + ey, x0 + sx0:x0 + ex] = mask
        objects.append({"shape": shape, "colour": obj_colour, "texture": obj_texture, "cx": round(cx, 2),
                        "cy": round(cy, 2), "r": round(r, 2), "anchor": [int(round(ax)), int(round(ay))]})
    return img, objects, masks


def scene_labels(objects: list[dict], rng: np.random.Generator, d: Dictionary) -> dict[int, float]:
    """Leaves of each object with a drawn confidence, then every ancestor at its best child's."""
    index = {name: i for i, name in enumerate(d.names)}
    labels: dict[int, float] = {}
    leaves = [index[o[k]] for o in objects for k in ("shape", "colour", "texture")]
    if len(objects) >= CROWDED:
        leaves.append(index["crowded scene"])
    for leaf in leaves:
        conf = float(rng.choice(CONFS[0], p=CONFS[1]))
        for k in [leaf, *d.ancestors(leaf)]:
            labels[k] = max(labels.get(k, 0.0), conf)
    return labels


def object_class(obj: dict) -> str:
    """The single label of an object-centric image: its colour and texture ("red-striped", 18 classes)."""
    return f"{obj['colour']}-{obj['texture']}"


OBJECT_CLASSES = [f"{c}-{t}" for c in COLOURS for t in TEXTURES]
