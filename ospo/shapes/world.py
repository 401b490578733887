"""ShapesWorld scenes: specifications, deterministic sampling, rendering and true masks.

A *scene* (:class:`Scene`) is what a prompt asks for: one to three groups of objects
(:class:`Group`: a shape, an optional colour, a count), at most three objects in all, and
optionally a 2D relation of the first group to the second. A *layout* (:class:`Layout`)
is one concrete picture of a scene: every object with its colour and its box on the grid.

Geometry (chosen so that an 8 x 8 VQ grid lines up with the objects, see
../shared/shapesworld-notes.md): a 64 x 64 px white canvas, 8 px token cells; each object
fills a 24 px box (3 x 3 cells) whose corner sits on the cell grid; boxes never touch
(at least one free cell between any two, in rows or in columns), so objects of the same
colour never merge, also after a VQ round trip. A relation holds in a layout when, for every
pair (a of group 0, b of group 1), the boxes are apart along the relation's axis and that
axis dominates (``|d_other| < d_axis``); the evaluator checks the same rule on detected
centroids, with slack.

Everything random takes a ``random.Random``; :func:`sample_scenes` derives one per
(seed, sub-category, index) from a string, so a scene set is the same on every machine
and Python version (string seeding hashes with SHA-512).

Speed (2 shared CPU cores): :func:`render_batch` draws 2,000 images in 0.15-0.25 s (about
10,000 per second); sampling their layouts takes another ~0.06 s
(``python -m ospo.shapes.world`` measures it).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# --- the world's constants ------------------------------------------------------------

SIZE = 64                 # canvas side (px)
CELL = 8                  # token cell side (px): an 8 x 8 VQ grid over 64 px
GRID = SIZE // CELL       # 8 cells per side
BOX_CELLS = 3             # an object's box: 3 x 3 cells (24 px)
BOX = BOX_CELLS * CELL
POSITIONS = GRID - BOX_CELLS + 1   # box corner cell index 0..5 per axis
GAP_CELLS = 1             # free cells between two boxes (rows or columns)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND = (255, 255, 255)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_OBJECTS = 3
MAX_COUNT = 3

# The OSPO sub-categories (ospo.templates.SUB_CATEGORIES names) this world can depict.
COVERED: tuple[str, ...] = ("color", "shape", "spatial_2d", "numeracy", "complex")


# --- scene specification -------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """``count`` objects of one ``shape``; ``color`` None means "any colour"."""

    shape: str
    count: int = 1
    color: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r} (known: {', '.join(SHAPES)})")
        if self.color is not None and self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r} (known: {', '.join(COLORS)})")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count {self.count} outside 1..{MAX_COUNT}")

    def to_dict(self) -> dict:
        return {"shape": self.shape, "count": self.count, "color": self.color}


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for. ``relation`` is that of ``groups[0]`` to ``groups[1]``.

    Valid scenes: 1-3 groups, at most three objects in all, a relation only between
    exactly two groups, and groups that can be told apart (two groups of the same shape
    both carry colours, and different ones), so every requirement has one meaning.
    """

    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if not 1 <= len(self.groups) <= 3:
            raise ValueError("a scene has 1 to 3 groups")
        if self.num_objects > MAX_OBJECTS:
            raise ValueError(f"a scene has at most {MAX_OBJECTS} objects")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}")
            if len(self.groups) != 2:
                raise ValueError("a relation needs exactly two groups")
        for i, a in enumerate(self.groups):
            for b in self.groups[i + 1:]:
                if a.shape == b.shape and (a.color is None or b.color is None or a.color == b.color):
                    raise ValueError(f"groups of {a.shape}s cannot be told apart (give both distinct colors)")

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Group(**g) for g in d["groups"]), d.get("relation"))


def is_valid(groups, relation=None) -> bool:
    try:
        Scene(tuple(groups), relation)
        return True
    except ValueError:
        return False


# --- layouts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Obj:
    """One drawn object: its group index, shape, colour and box corner (in cells)."""

    group: int
    shape: str
    color: str
    row: int
    col: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) in pixels."""
        y, x = self.row * CELL, self.col * CELL
        return y, x, y + BOX, x + BOX

    @property
    def center(self) -> tuple[float, float]:
        """(y, x) box centre in pixels."""
        return self.row * CELL + BOX / 2, self.col * CELL + BOX / 2


@dataclass(frozen=True)
class Layout:
    scene: Scene
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"scene": self.scene.to_dict(),
                "objects": [dict(group=o.group, shape=o.shape, color=o.color, row=o.row, col=o.col)
                            for o in self.objects]}


def _rel_ok(rel: str, ra, ca, rb, cb):
    """Does a box at (ra, ca) stand in ``rel`` to a box at (rb, cb)? (cells; arrays ok)"""
    if rel == "left of":
        d, other = cb - ca, rb - ra
    elif rel == "right of":
        d, other = ca - cb, rb - ra
    elif rel == "above":
        d, other = rb - ra, cb - ca
    elif rel == "below":
        d, other = ra - rb, cb - ca
    else:
        raise ValueError(rel)
    return (d >= BOX_CELLS) & (np.abs(other) < d)


@lru_cache(maxsize=None)
def valid_placements(counts: tuple[int, ...], relation: str | None) -> np.ndarray:
    """Every placement of ``sum(counts)`` boxes (rows of (r0, c0, r1, c1, ...)) in which no
    two boxes touch and the relation of group 0 to group 1 holds. Enumerated once per
    pattern (at most 36^3 tuples, vectorized)."""
    n = sum(counts)
    idx = np.indices((POSITIONS * POSITIONS,) * n).reshape(n, -1)
    rows, cols = idx // POSITIONS, idx % POSITIONS
    ok = np.ones(idx.shape[1], dtype=bool)
    sep = BOX_CELLS + GAP_CELLS
    for i in range(n):
        for j in range(i + 1, n):
            ok &= (np.abs(rows[i] - rows[j]) >= sep) | (np.abs(cols[i] - cols[j]) >= sep)
    if relation is not None:
        group_of = [g for g, c in enumerate(counts) for _ in range(c)]
        for i in range(n):
            for j in range(n):
                if group_of[i] == 0 and group_of[j] == 1:
                    ok &= _rel_ok(relation, rows[i], cols[i], rows[j], cols[j])
    keep = np.stack([rows[:, ok], cols[:, ok]], axis=-1)  # (n, m, 2)
    return np.ascontiguousarray(keep.transpose(1, 0, 2))  # (m, n, 2)


def sample_layout(scene: Scene, rng: random.Random) -> Layout:
    """A uniformly drawn placement of the scene; unspecified colours drawn per object."""
    places = valid_placements(tuple(g.count for g in scene.groups), scene.relation)
    if len(places) == 0:
        raise ValueError(f"no placement for {scene}")
    pick = places[rng.randrange(len(places))]
    objs, k = [], 0
    for gi, g in enumerate(scene.groups):
        for _ in range(g.count):
            color = g.color if g.color is not None else rng.choice(COLORS)
            objs.append(Obj(gi, g.shape, color, int(pick[k, 0]), int(pick[k, 1])))
            k += 1
    return Layout(scene, tuple(objs))


# --- rendering and masks ---------------------------------------------------------------

def _stamps() -> dict[str, np.ndarray]:
    """Boolean 24 x 24 masks of the shapes, tested at pixel centres; areas 312-324 px for
    circle and square (so size never tells them apart), ~200 px for the triangle."""
    yy, xx = np.mgrid[0:BOX, 0:BOX] + 0.5
    c = BOX / 2
    circle = (yy - c) ** 2 + (xx - c) ** 2 <= 10.0 ** 2
    square = (yy >= 3) & (yy < 21) & (xx >= 3) & (xx < 21)
    # Upright isosceles triangle: apex (y=2, x=12), base y=22 from x=2 to x=22.
    top, base, half = 2.0, 22.0, 10.0
    t = (yy - top) / (base - top)
    triangle = (t >= 0) & (t <= 1) & (np.abs(xx - c) <= t * half)
    return {"circle": circle, "square": square, "triangle": triangle}


STAMPS: dict[str, np.ndarray] = _stamps()
_STAMPS3 = {k: np.repeat(v[:, :, None], 3, axis=2) for k, v in STAMPS.items()}
_FILLS = {c: np.broadcast_to(np.array(rgb, dtype=np.uint8), (BOX, BOX, 3)) for c, rgb in PALETTE.items()}


def render(layout: Layout) -> np.ndarray:
    """(64, 64, 3) uint8 RGB image of a layout."""
    return render_batch([layout])[0]


def render_batch(layouts: list[Layout]) -> np.ndarray:
    """(N, 64, 64, 3) uint8 images."""
    out = np.empty((len(layouts), SIZE, SIZE, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    for n, lay in enumerate(layouts):
        for o in lay.objects:
            y, x = o.row * CELL, o.col * CELL
            np.copyto(out[n, y:y + BOX, x:x + BOX], _FILLS[o.color], where=_STAMPS3[o.shape])
    return out


def to_pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(img, dtype=np.uint8), "RGB")


def object_masks(layout: Layout) -> np.ndarray:
    """(n_objects, 64, 64) bool: the pixels of each object, in layout order."""
    m = np.zeros((len(layout.objects), SIZE, SIZE), dtype=bool)
    for k, o in enumerate(layout.objects):
        y0, x0, y1, x1 = o.box
        m[k, y0:y1, x0:x1] = STAMPS[o.shape]
    return m


def token_masks(pixel_masks: np.ndarray, min_frac: float = 0.1) -> np.ndarray:
    """(..., 64, 64) pixel masks -> (..., 8, 8) token-cell masks: a cell belongs to an object
    when at least ``min_frac`` of its 64 pixels do. Row-major like the token sequence
    (token t is cell (t // 8, t % 8)), so ``.reshape(-1, 64)`` lines up with it."""
    pm = np.asarray(pixel_masks, dtype=bool)
    lead = pm.shape[:-2]
    cells = pm.reshape(*lead, GRID, CELL, GRID, CELL).mean(axis=(-3, -1))
    return cells >= min_frac


def group_token_masks(layout: Layout, min_frac: float = 0.1) -> np.ndarray:
    """(n_groups, 8, 8) bool: the union of each group's objects' token masks."""
    tm = token_masks(object_masks(layout), min_frac)
    out = np.zeros((len(layout.scene.groups), GRID, GRID), dtype=bool)
    for k, o in enumerate(layout.objects):
        out[o.group] |= tm[k]
    return out


# --- scene sampling per sub-category ------------------------------------------------------

def _maybe_color(rng: random.Random, p: float) -> str | None:
    return rng.choice(COLORS) if rng.random() < p else None


def _sample_color(rng):
    n = rng.choices([1, 2, 3], weights=[0.15, 0.65, 0.2])[0]
    colors = rng.sample(COLORS, n)
    return tuple(Group(rng.choice(SHAPES), 1, c) for c in colors), None


def _sample_shape(rng):
    n = rng.choices([1, 2, 3], weights=[0.1, 0.7, 0.2])[0]
    shapes = rng.sample(SHAPES, n)
    mode = rng.choices(["none", "shared", "each"], weights=[0.5, 0.25, 0.25])[0]
    shared = rng.choice(COLORS)
    colors = [None if mode == "none" else shared if mode == "shared" else rng.choice(COLORS) for _ in shapes]
    return tuple(Group(s, 1, c) for s, c in zip(shapes, colors)), None


def _sample_spatial(rng):
    gs = tuple(Group(rng.choice(SHAPES), 1, _maybe_color(rng, 0.5)) for _ in range(2))
    return gs, rng.choice(RELATIONS)


def _sample_numeracy(rng):
    if rng.random() < 0.5:
        return (Group(rng.choice(SHAPES), rng.choice([2, 3]), _maybe_color(rng, 0.5)),), None
    counts = rng.choice([(2, 1), (1, 2)])
    return tuple(Group(rng.choice(SHAPES), c, _maybe_color(rng, 0.5)) for c in counts), None


def _sample_complex(rng):
    # At least two of: attribute binding (every group coloured), a count > 1, a relation.
    while True:
        colored, counted, related = rng.random() < 0.7, rng.random() < 0.6, rng.random() < 0.75
        if colored + counted + related >= 2:
            break
    counts = rng.choice([(2, 1), (1, 2)]) if counted else (1, 1)
    gs = tuple(Group(rng.choice(SHAPES), c, rng.choice(COLORS) if colored else _maybe_color(rng, 0.3))
               for c in counts)
    return gs, (rng.choice(RELATIONS) if related else None)


SAMPLERS = {"color": _sample_color, "shape": _sample_shape, "spatial_2d": _sample_spatial,
            "numeracy": _sample_numeracy, "complex": _sample_complex}


def sample_scene(sub_category: str, rng: random.Random) -> Scene:
    """One valid scene of a covered sub-category (redrawn until valid)."""
    if sub_category not in SAMPLERS:
        raise ValueError(f"ShapesWorld does not cover sub-category {sub_category!r} (covers: {', '.join(COVERED)})")
    while True:
        groups, rel = SAMPLERS[sub_category](rng)
        if is_valid(groups, rel):
            return Scene(groups, rel)


def scene_rng(seed: int, *parts) -> random.Random:
    """A ``random.Random`` that depends only on (seed, parts)."""
    return random.Random(":".join(str(p) for p in ("shapes", seed, *parts)))


def sample_scenes(sub_category: str, n: int, seed: int = 0) -> list[Scene]:
    """n scenes of a sub-category, scene i drawn from its own stream (seed, sub, i)."""
    return [sample_scene(sub_category, scene_rng(seed, sub_category, i)) for i in range(n)]


def sample_layouts(scenes: list[Scene], seed: int = 0, tag: str = "layout") -> list[Layout]:
    """One layout per scene, layout i from its own stream (seed, tag, i)."""
    return [sample_layout(s, scene_rng(seed, tag, i)) for i, s in enumerate(scenes)]


def benchmark(n: int = 2000) -> dict:
    """Render speed: scenes sampled over the covered sub-categories, then drawn."""
    scenes = [s for sub in COVERED for s in sample_scenes(sub, n // len(COVERED), seed=123)]
    t0 = time.perf_counter()
    layouts = sample_layouts(scenes, seed=123)
    t1 = time.perf_counter()
    imgs = render_batch(layouts)
    t2 = time.perf_counter()
    return {"n": len(imgs), "layout_s": t1 - t0, "render_s": t2 - t1,
            "images_per_s": len(imgs) / max(t2 - t1, 1e-9)}


if __name__ == "__main__":
    valid_placements((1, 1, 1), None)  # warm the enumeration cache
    print(benchmark())
