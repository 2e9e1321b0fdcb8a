"""The built-in synthetic image-text world: the embedded default dataset.

Every image shows one to three coloured shapes on a textured background, rendered procedurally. What the shapes,
colours, sizes, positions, backgrounds, phrasings and web noise are is the world's family (``synth.family``,
`clipdr.data.families`): ``shapes``, the default and the demo's, or ``tiles``; this module samples, renders and
captions any family with the same code, and the names below (``SHAPES``, ``TASKS``, ...) are the first family's. Each
sample is a pure function of ``(seed, split, index)``: its random generator is
``numpy.random.default_rng([seed, split_id, index])``, so any shard can be regenerated on its own, in any
process, and comes out byte-identical.

Splits (disjoint: every split draws from its own random streams and keys carry the split name):

- ``teacher``: a large corpus with clean, compositional captions that state every attribute (count,
  size, colour, shape, position, background colour and texture). Teachers and the captioner learn here.
- ``student``: the same kind of images with noisy web alt-text: short, mostly without position, size,
  count and background, sometimes wrong, padded with filler, and sometimes unrelated to the image.
  This is the corpus that gets reinforced.
- ``zeroshot``: single-object images for zero-shot classification, one clip_benchmark webdataset folder
  per task of the family (`Family.tasks`); ``object`` ("<colour> <shape>", 64 classes in the first family) is the
  headline task, balanced: sample i shows object class i mod the number of classes.
- ``retrieval``: images with clean captions, for image-text retrieval.

Layout under ``SynthConfig.output``::

    teacher/teacher-00000.tar ...        webdataset: key.jpg, key.txt, key.json
    teacher/parquet/teacher-00000.parquet ...   with "parquet" in formats: key, image, caption, meta
    student/student-00000.tar ...
    retrieval/retrieval-00000.tar ...
    zeroshot/<task>/classnames.txt
    zeroshot/<task>/zeroshot_classification_templates.txt
    zeroshot/<task>/test/nshards.txt, 0.tar, 1.tar ...    key.jpg + key.cls (clip_benchmark layout)
    world.json                                            written last: the completion marker

`generate` skips all work when ``world.json`` records the same world (same config, same
`WORLD_VERSION`), so the demo pays for the world once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

import clipdr
from clipdr import storage
from clipdr.config import Config, NoiseConfig, SynthConfig, to_dict
from clipdr.data import families
from clipdr.data.families import Family
from clipdr.data.sources import SourceSample, write_parquet_shard, write_tar_shard, write_webdataset_shard

# Bump whenever the rendered bytes or captions of a given config change, so cached worlds regenerate.
WORLD_VERSION = 2

# --------------------------------------------------------------------------- vocabulary

# The first family's vocabulary under its historical names (the demo's world; benchmarks and tests use them).
# A world's own vocabulary is its family's (`families.family(cfg.family)`).
FIRST = families.SHAPES
SHAPES = FIRST.shapes
COLOURS = FIRST.colours
SIZES = tuple(FIRST.sizes)
SIZE_FRACTIONS = FIRST.sizes
POSITIONS = FIRST.positions
POSITION_PHRASES = FIRST.position_phrases
BACKGROUND_COLOURS = FIRST.background_colours
TEXTURES = FIRST.textures
FILLERS = FIRST.fillers
IRRELEVANT = FIRST.irrelevant
ZEROSHOT_TEMPLATES = FIRST.zeroshot_templates
TASKS = FIRST.tasks
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")

SPLITS = ("teacher", "student", "zeroshot", "retrieval")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
# Probability of 1, 2, 3 objects (truncated and renormalised by SynthConfig.max_objects).
_COUNT_WEIGHTS = (0.5, 0.3, 0.2)
_OBJECT_JITTER = 14  # per-channel uniform jitter of object colours
_BACKGROUND_JITTER = 6  # smaller: muted colours drift into each other's names sooner
_MAX_ROTATION = 15.0  # degrees; small enough that a square never turns into a diamond, a cross into an x
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing
_JPEG_QUALITY = 92
# Texture contrast in grey levels: visible, yet well below the contrast between objects and background.
_PATTERN_AMPLITUDE = 20
_GRAIN_AMPLITUDE = 22

# --------------------------------------------------------------------------- zero-shot tasks


def zeroshot_tasks(family: Family = FIRST) -> dict[str, tuple[str, ...]]:
    """Class names of every zero-shot task of a family; a label is an index into its task's tuple."""
    classnames = {
        "object": tuple(f"{colour} {shape}" for colour in family.colours for shape in family.shapes),
        "shape": family.shapes,
        "colour": tuple(family.colours),
        "fill": family.fills,
        "size": tuple(family.sizes),
        "position": tuple(family.position_phrases.values()),
        "background": tuple(family.background_colours),
        "texture": family.textures,
    }
    return {task: classnames[task] for task in family.tasks}


def zeroshot_labels(scene: Scene, family: Family = FIRST) -> dict[str, int]:
    """The label of a single-object scene in every zero-shot task of its family."""
    if len(scene.objects) != 1:
        raise ValueError(f"zero-shot labels need a single-object scene, got {len(scene.objects)} objects")
    obj = scene.objects[0]
    colour_index = tuple(family.colours).index(obj.colour)
    shape_index = family.shapes.index(obj.shape)
    labels = {
        "object": colour_index * len(family.shapes) + shape_index,
        "shape": shape_index,
        "colour": colour_index,
        "fill": family.fills.index(obj.fill),
        "size": tuple(family.sizes).index(obj.size),
        "position": family.positions.index(obj.position),
        "background": tuple(family.background_colours).index(scene.background.colour),
        "texture": family.textures.index(scene.background.texture),
    }
    return {task: labels[task] for task in family.tasks}


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape: its named attributes plus the exact jittered values the renderer draws."""

    shape: str
    colour: str
    size: str
    position: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]  # (x, y) as fractions of the image side
    angle: float  # degrees
    fill: str = "solid"  # "hollow": drawn as an outline (families with fills)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "rgb": list(self.rgb),
            "center": list(self.center),
            "angle": self.angle,
        }
        # Solid, the only fill of the first family, is left out: its worlds' metadata predates fills.
        return data if self.fill == "solid" else {**data, "fill": self.fill}


@dataclass(frozen=True)
class Background:
    """Background colour and texture; ``texture_seed`` fixes the pattern's period, orientation, phase
    and the grain."""

    colour: str
    texture: str
    rgb: tuple[int, int, int]
    texture_seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "texture": self.texture,
            "rgb": list(self.rgb),
            "texture_seed": self.texture_seed,
        }


@dataclass(frozen=True)
class Scene:
    """Everything an image shows; `render_scene` is a pure function of it."""

    objects: tuple[SceneObject, ...]
    background: Background

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; `Scene.from_dict` inverts it exactly."""
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        objects = tuple(
            SceneObject(**{**o, "rgb": tuple(o["rgb"]), "center": tuple(o["center"])}) for o in data["objects"]
        )
        bg = data["background"]
        return cls(objects=objects, background=Background(**{**bg, "rgb": tuple(bg["rgb"])}))


# Scalar draws through rng.random(): several times cheaper than rng.integers / rng.choice per call, and
# sampling cost matters at thousands of samples per second.
def _randint(rng: np.random.Generator, n: int) -> int:
    return int(rng.random() * n)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.random() * len(options))]


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], jitter: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + _randint(rng, 2 * jitter + 1) - jitter)) for c in rgb)
    return (r, g, b)


def sample_scene(
    rng: np.random.Generator,
    max_objects: int = 3,
    *,
    num_objects: int | None = None,
    colour: str | None = None,
    shape: str | None = None,
    family: Family = FIRST,
) -> Scene:
    """Draws a random scene of a family: objects in distinct grid cells, jittered within their cell.

    Args:
        rng: The sample's random generator; the scene is a pure function of its state.
        max_objects: Most objects in a scene (1 to 3); counts are drawn with weights 0.5/0.3/0.2.
        num_objects: Exact number of objects instead of a random count.
        colour: Colour of the first object instead of a random one.
        shape: Shape of the first object instead of a random one.
        family: The world family whose vocabulary the scene uses.
    """
    if not 1 <= max_objects <= len(_COUNT_WEIGHTS):
        raise ValueError(f"max_objects must be between 1 and {len(_COUNT_WEIGHTS)}, got {max_objects}")
    if colour is not None and colour not in family.colours:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(family.colours)}")
    if shape is not None and shape not in family.shapes:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(family.shapes)}")
    positions = family.positions
    if num_objects is None:
        weights = _COUNT_WEIGHTS[:max_objects]
        u = rng.random() * sum(weights)
        num_objects = 1
        while num_objects < max_objects and u >= sum(weights[:num_objects]):
            num_objects += 1
    elif not 1 <= num_objects <= len(positions):
        raise ValueError(f"num_objects must be between 1 and {len(positions)}, got {num_objects}")
    colour_names, sizes = tuple(family.colours), tuple(family.sizes)
    cells = list(range(len(positions)))
    objects = []
    for i in range(num_objects):
        cell = cells.pop(_randint(rng, len(cells)))
        obj_colour = colour if (i == 0 and colour is not None) else _pick(rng, colour_names)
        obj_shape = shape if (i == 0 and shape is not None) else _pick(rng, family.shapes)
        size = _pick(rng, sizes)
        # Drawn only where there is a choice: a family without fills keeps the first family's random streams.
        fill = _pick(rng, family.fills) if len(family.fills) > 1 else family.fills[0]
        # Jitter inside the cell so that objects in distinct cells never overlap.
        slack = max(0.0, (1 / family.grid - family.sizes[size]) / 2)
        row, col = divmod(cell, family.grid)
        x = (col + 0.5) / family.grid + _uniform(rng, -slack, slack)
        y = (row + 0.5) / family.grid + _uniform(rng, -slack, slack)
        angle = 0.0 if obj_shape in family.round_shapes else _uniform(rng, -_MAX_ROTATION, _MAX_ROTATION)
        objects.append(
            SceneObject(
                shape=obj_shape,
                colour=obj_colour,
                size=size,
                position=positions[cell],
                rgb=_jitter_rgb(rng, family.colours[obj_colour], _OBJECT_JITTER),
                center=(round(x, 4), round(y, 4)),
                angle=round(angle, 2),
                fill=fill,
            )
        )
    bg_colour = _pick(rng, tuple(family.background_colours))
    background = Background(
        colour=bg_colour,
        texture=_pick(rng, family.textures),
        rgb=_jitter_rgb(rng, family.background_colours[bg_colour], _BACKGROUND_JITTER),
        texture_seed=_randint(rng, 2**31),
    )
    return Scene(objects=tuple(objects), background=background)


# --------------------------------------------------------------------------- rendering

_STRIPE_ORIENTATIONS = 4  # horizontal, vertical, two diagonals
_PERIODS = (6, 7, 8, 9, 10, 11)  # pattern periods in pixels of a 64 px image; scaled with the size


@functools.lru_cache(maxsize=256)
def _pattern_mask(texture: str, period: int, orientation: int, side: int) -> Image.Image:
    """A 0/1 mask image, large enough that any crop of ``side`` pixels at an offset below ``2 * period``
    is a phase-shifted copy of the same pattern."""
    extent = side + 2 * period
    ys, xs = np.mgrid[0:extent, 0:extent]
    if texture == "striped":
        coord = (ys, xs, xs + ys, xs - ys + 2 * extent)[orientation]
        mask = (coord % period) < period / 2
    elif texture == "checkered":
        mask = ((xs // period + ys // period) % 2).astype(bool)
    elif texture == "dotted":
        u = xs % period - (period - 1) / 2
        v = ys % period - (period - 1) / 2
        mask = u * u + v * v < (0.22 * period) ** 2
    elif texture == "gridded":  # thin lines along both axes
        width = max(1, period // 4)
        mask = (xs % period < width) | (ys % period < width)
    else:
        raise ValueError(f"no pattern for texture {texture!r}")
    return Image.fromarray(mask.astype(np.uint8), mode="L")


def _render_background(background: Background, side: int, image_size: int) -> Image.Image:
    rgb = background.rgb
    if background.texture == "plain":
        return Image.new("RGB", (side, side), rgb)
    seed = background.texture_seed
    if background.texture == "grainy":
        # Grain lives on output pixels: draw it at image_size and upscale with nearest neighbours.
        size = (image_size, image_size, 1)
        grain = np.random.default_rng(seed).integers(-_GRAIN_AMPLITUDE, _GRAIN_AMPLITUDE + 1, size, dtype=np.int16)
        pixels = np.minimum(np.maximum(grain + np.asarray(rgb, dtype=np.int16), 0), 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="RGB").resize((side, side), Image.Resampling.NEAREST)
    if background.texture == "speckled":
        # Sparse specks of the pattern's mark colour (see below) on output pixels, like the grain.
        specks = np.random.default_rng(seed).random((image_size, image_size, 1)) < 0.08
        shift = _PATTERN_AMPLITUDE if sum(rgb) < 3 * 128 else -_PATTERN_AMPLITUDE
        pixels = np.clip(np.asarray(rgb, dtype=np.int16) + 2 * shift * specks, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="RGB").resize((side, side), Image.Resampling.NEAREST)
    if background.texture == "gradient":
        # A linear ramp of +-1.5 pattern amplitudes around the colour, along one of four directions.
        ramp = np.linspace(-1.5 * _PATTERN_AMPLITUDE, 1.5 * _PATTERN_AMPLITUDE, side)
        ramp = ramp if seed % 2 else ramp[::-1]
        line = np.clip(np.rint(np.asarray(rgb, dtype=np.float64) + ramp[:, None]), 0, 255).astype(np.uint8)
        pixels = np.broadcast_to(line[:, None] if (seed // 2) % 2 else line[None, :], (side, side, 3))
        return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    scale = side / 64
    period = max(2, round(_PERIODS[seed % len(_PERIODS)] * scale))
    orientation = (seed // len(_PERIODS)) % _STRIPE_ORIENTATIONS
    ox = (seed // 97) % (2 * period)
    oy = (seed // 9973) % (2 * period)
    # Pattern marks go lighter on dark backgrounds and darker on light ones, so they always show.
    shift = _PATTERN_AMPLITUDE if sum(rgb) < 3 * 128 else -_PATTERN_AMPLITUDE
    mark = [min(255, max(0, c + shift)) for c in rgb]
    # The 0/1 mask becomes a two-colour palette image: several times faster than pasting through a mask.
    pattern = _pattern_mask(background.texture, period, orientation, side).crop((ox, oy, ox + side, oy + side))
    pattern.putpalette([*rgb, *mark])
    return pattern.convert("RGB")


def _regular_polygon(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + 360 * k / n) for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


@functools.lru_cache(maxsize=16)
def _unit_outline(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon outline of a shape whose extent is about one unit of radius, centred on the origin.

    Areas are roughly matched (circle 3.1, hexagon 2.9, square 2.6, cross 2.5, triangle 2.0, diamond 2.0,
    star 1.9, in units of radius squared) so that size, not shape, decides how big an object looks.
    """
    if shape == "square":
        points = _regular_polygon(4, 1.15, 45)
    elif shape == "diamond":  # a rhombus, taller than wide, so it never looks like a turned square
        points = [(0.0, -1.2), (0.85, 0.0), (0.0, 1.2), (-0.85, 0.0)]
    elif shape == "triangle":  # pointing up; shifted down so its box is centred
        points = [(x, y + 0.22) for x, y in _regular_polygon(3, 1.25, -90)]
    elif shape == "hexagon":
        points = _regular_polygon(6, 1.05, 0)
    elif shape == "star":
        outer, inner = 1.2, 0.55
        points = [
            ((outer, inner)[k % 2] * math.cos(a), (outer, inner)[k % 2] * math.sin(a) + 0.08)
            for k, a in enumerate(math.radians(-90 + 36 * k) for k in range(10))
        ]
    elif shape == "cross":
        a, w = 1.05, 0.36
        points = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w)]
        points.append((-w, -w))
    # The tiles family's shapes (families.TILES).
    elif shape == "pentagon":
        points = [(x, y + 0.1) for x, y in _regular_polygon(5, 1.15, -90)]
    elif shape == "arrow":  # pointing right
        points = [(-1.1, -0.3), (0.2, -0.3), (0.2, -0.8), (1.15, 0.0), (0.2, 0.8), (0.2, 0.3), (-1.1, 0.3)]
    elif shape == "crescent":  # a disc of radius 1.1 less one of 0.95 centred at x = 0.55 (they cross at 60 deg)
        outer = [(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in map(math.radians, range(60, 301, 10))]
        inner = [(0.55 + 0.95 * math.cos(a), 0.95 * math.sin(a)) for a in map(math.radians, range(270, 89, -10))]
        points = [(x + 0.275, y) for x, y in outer + inner]
    elif shape == "bar":
        points = [(-1.15, -0.45), (1.15, -0.45), (1.15, 0.45), (-1.15, 0.45)]
    elif shape == "oval":
        points = [(1.15 * math.cos(2 * math.pi * k / 32), 0.7 * math.sin(2 * math.pi * k / 32)) for k in range(32)]
    elif shape == "chevron":  # pointing up
        points = [(0.0, -0.9), (1.1, 0.2), (1.1, 0.85), (0.0, -0.2), (-1.1, 0.85), (-1.1, 0.2)]
    else:
        raise ValueError(f"no outline for shape {shape!r}")
    return tuple(points)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, extent: float) -> None:
    cx, cy = obj.center[0] * side, obj.center[1] * side
    radius = extent * side / 2
    if obj.shape in ("circle", "ring"):
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=obj.rgb)
        else:
            draw.ellipse(box, outline=obj.rgb, width=max(2, round(radius * 0.42)))
        return
    cos_a, sin_a = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    points = [
        (cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a))
        for x, y in _unit_outline(obj.shape)
    ]
    if obj.fill == "hollow":
        draw.polygon(points, outline=obj.rgb, width=max(2, round(radius * 0.3)))
    else:
        draw.polygon(points, fill=obj.rgb)


def render_scene(scene: Scene, image_size: int = 64, family: Family = FIRST) -> Image.Image:
    """Renders a scene of a family as an RGB image of ``image_size`` x ``image_size`` pixels (anti-aliased)."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    side = image_size * _SUPERSAMPLE
    canvas = _render_background(scene.background, side, image_size)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, side, family.sizes[obj.size])
    return canvas.reduce(_SUPERSAMPLE)


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes without chroma subsampling: colour must survive on objects a few pixels wide."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


# --------------------------------------------------------------------------- clean captions


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _counted(n: int, noun: str) -> str:
    word = COUNT_WORDS[n] if n < len(COUNT_WORDS) else str(n)
    return f"{word} {noun}" + ("" if n == 1 else "s")


def clean_caption(scene: Scene, rng: np.random.Generator, family: Family = FIRST) -> str:
    """A compositional caption that states every attribute, in one of the family's phrasings.

    Always present: the count as a word ("two shapes"), and per object its size, fill (families with fills),
    colour, shape and position phrase (`Family.position_phrases`), and the background's colour and texture.
    """
    noun = _pick(rng, family.nouns)
    count = _counted(len(scene.objects), noun)
    bg = scene.background
    object_format, caption_format = family.caption_styles[_randint(rng, len(family.caption_styles))]
    objs = [
        object_format.format(
            size=o.size, fill=o.fill, colour=o.colour, shape=o.shape, position=family.position_phrases[o.position]
        )
        for o in scene.objects
    ]
    return caption_format.format(
        count=count, texture=bg.texture, background=bg.colour, objects_and=_join(objs), objects_semi="; ".join(objs)
    )


# --------------------------------------------------------------------------- noisy captions


@dataclass(frozen=True)
class NoisyCaption:
    """A noisy caption and what went into it (kept in the student split's meta for analysis)."""

    text: str
    irrelevant: bool
    num_stated: int  # attribute values the caption states
    num_wrong: int  # of which wrong


def _irrelevant_text(rng: np.random.Generator, family: Family) -> str:
    kind = _randint(rng, 4)
    if kind == 0:
        return f"IMG_{_randint(rng, 10000):04d}"
    if kind == 1:
        return f"DSC{_randint(rng, 100000):05d}.jpg"
    return _pick(rng, family.irrelevant)


def noisy_caption_details(
    scene: Scene, rng: np.random.Generator, noise: NoiseConfig, family: Family = FIRST
) -> NoisyCaption:
    """Web alt-text for a scene, with a record of how much of it is true. See `noisy_caption`."""
    if rng.random() < noise.irrelevant_rate:
        return NoisyCaption(_irrelevant_text(rng, family), irrelevant=True, num_stated=0, num_wrong=0)
    stated = wrong = 0

    def say(value: Any, choices: Sequence[Any]) -> Any:
        # Every stated attribute goes through here, so the wrong-rate is the same for all of them.
        nonlocal stated, wrong
        stated += 1
        if rng.random() < noise.wrong_rate:
            wrong += 1
            others = [c for c in choices if c != value]
            return _pick(rng, others)
        return value

    chunks: list[list[str]] = []  # each chunk is a list of units; shuffling permutes units and chunks
    for i, obj in enumerate(scene.objects):
        if i > 0 and rng.random() < noise.drop_object:
            continue
        units = []
        if rng.random() >= noise.drop_size:
            units.append(say(obj.size, tuple(family.sizes)))
        if rng.random() >= noise.drop_colour:
            colour = say(obj.colour, tuple(family.colours))
            synonyms = family.colour_synonyms.get(colour, ())
            # An everyday name is not a wrong one: it is counted as stated, never as wrong.
            if synonyms and rng.random() < family.synonym_rate:
                colour = _pick(rng, synonyms)
            units.append(colour)
        if rng.random() >= noise.drop_shape:
            # A family with fills says an object's fill with its shape ("hollow arrow"): drop_shape drops both.
            if len(family.fills) > 1:
                units.append(say(obj.fill, family.fills))
            units.append(say(obj.shape, family.shapes))
        else:
            units.append(family.generic_noun)
        if rng.random() >= noise.drop_position:
            units.append(family.position_phrases[say(obj.position, family.positions)])
        chunks.append(units)
    if len(scene.objects) > 1 and rng.random() >= noise.drop_count:
        n = say(len(scene.objects), range(1, len(_COUNT_WEIGHTS) + 1))
        chunks.insert(0, [f"{n} {family.generic_noun}s" if n > 1 else f"1 {family.generic_noun}"])
    if rng.random() >= noise.drop_background:
        mode = _randint(rng, 3)  # colour and texture, colour only, texture only
        words = []
        if mode in (0, 2):
            words.append(say(scene.background.texture, family.textures))
        if mode in (0, 1):
            words.append(say(scene.background.colour, tuple(family.background_colours)))
        chunks.append([f"on {' '.join(words)} background"])
    if rng.random() < noise.filler_rate:
        for _ in range(1 + _randint(rng, 2)):
            filler = [_pick(rng, family.fillers)]
            chunks.insert(0 if rng.random() < 0.3 else len(chunks), filler)
    if rng.random() < noise.shuffle_rate:
        chunks = [[units[j] for j in rng.permutation(len(units))] for units in chunks]
        chunks = [chunks[j] for j in rng.permutation(len(chunks))]
    text = " ".join(" ".join(units) for units in chunks)
    style = rng.random()
    if style < 0.2:
        text = text.title()
    elif style < 0.3:
        text = text.replace(" ", "_" if style < 0.25 else "-")
    return NoisyCaption(text, irrelevant=False, num_stated=stated, num_wrong=wrong)


def noisy_caption(scene: Scene, rng: np.random.Generator, noise: NoiseConfig, family: Family = FIRST) -> str:
    """Short, incomplete, sometimes wrong web alt-text for a scene.

    Position, size, count and background are mostly omitted (``noise.drop_*``); every stated attribute
    is wrong with probability ``noise.wrong_rate``; filler ("stock photo", "#design", ...) is added with
    probability ``noise.filler_rate``; words and phrases are reordered with ``noise.shuffle_rate``; and a
    fraction ``noise.irrelevant_rate`` of captions has nothing to do with the image ("IMG_4821"). The filler and
    unrelated texts are the family's; a family with colour synonyms says a stated colour by one of them with
    probability ``family.synonym_rate``.
    """
    return noisy_caption_details(scene, rng, noise, family).text


# --------------------------------------------------------------------------- samples


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample: a pure function of ``(seed, split, index)``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def make_sample(cfg: SynthConfig, split: str, index: int) -> SourceSample:
    """Renders sample ``index`` of ``split``; the same arguments always give the same bytes.

    ``meta`` holds ``split``, ``index``, ``scene`` (`Scene.to_dict`), and per split: ``labels`` (zero-shot,
    task -> class index) or ``noise`` (student: whether the caption is irrelevant, how many attributes it
    states and how many of those are wrong).
    """
    family = families.family(cfg.family)
    rng = sample_rng(cfg.seed, split, index)
    meta: dict[str, Any] = {"split": split, "index": index}
    if split == "zeroshot":
        # Balanced headline task: sample i shows object class i mod the number of classes (64 in the first family).
        colour_index, shape_index = divmod(index % (len(family.colours) * len(family.shapes)), len(family.shapes))
        colour, shape = tuple(family.colours)[colour_index], family.shapes[shape_index]
        scene = sample_scene(rng, num_objects=1, colour=colour, shape=shape, family=family)
        caption = clean_caption(scene, rng, family)
        meta["labels"] = zeroshot_labels(scene, family)
    else:
        scene = sample_scene(rng, cfg.max_objects, family=family)
        if split == "student":
            noisy = noisy_caption_details(scene, rng, cfg.noise, family)
            caption = noisy.text
            meta["noise"] = {
                "irrelevant": noisy.irrelevant,
                "num_stated": noisy.num_stated,
                "num_wrong": noisy.num_wrong,
            }
        else:
            caption = clean_caption(scene, rng, family)
    meta["scene"] = scene.to_dict()
    image = render_scene(scene, cfg.image_size, family)
    return SourceSample(
        key=sample_key(split, index), image_bytes=encode_jpeg(image), caption=caption, meta=meta, image=image
    )


# --------------------------------------------------------------------------- generation

FORMATS = ("webdataset", "parquet")
_FORMAT_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}


def validate_config(cfg: SynthConfig) -> None:
    """Raises ValueError naming the first field of ``cfg`` that cannot make a world."""
    if cfg.family not in families.FAMILIES:
        raise ValueError(f"synth.family must be one of {list(families.FAMILIES)}, got {cfg.family!r}")
    if cfg.image_size < 16:
        raise ValueError(f"synth.image_size must be at least 16, got {cfg.image_size}")
    if cfg.seed < 0:
        raise ValueError(f"synth.seed must be non-negative, got {cfg.seed}")
    if not cfg.formats or any(f not in FORMATS for f in cfg.formats):
        raise ValueError(f"synth.formats must be a non-empty subset of {list(FORMATS)}, got {list(cfg.formats)}")
    if cfg.shard_size < 1:
        raise ValueError(f"synth.shard_size must be at least 1, got {cfg.shard_size}")
    if cfg.workers < 0:
        raise ValueError(f"synth.workers must be >= 0 (0: one per CPU), got {cfg.workers}")
    if not 1 <= cfg.max_objects <= len(_COUNT_WEIGHTS):
        raise ValueError(f"synth.max_objects must be between 1 and {len(_COUNT_WEIGHTS)}, got {cfg.max_objects}")
    for split in SPLITS:
        if split_size(cfg, split) < 0:
            raise ValueError(f"synth.num_{split} must be non-negative, got {split_size(cfg, split)}")
    for f in dataclasses.fields(cfg.noise):
        value = getattr(cfg.noise, f.name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"synth.noise.{f.name} is a probability in [0, 1], got {value}")


def split_size(cfg: SynthConfig, split: str) -> int:
    return {
        "teacher": cfg.num_teacher,
        "student": cfg.num_student,
        "zeroshot": cfg.num_zeroshot,
        "retrieval": cfg.num_retrieval,
    }[split]


def _shard_ranges(cfg: SynthConfig, split: str) -> list[tuple[int, int]]:
    n = split_size(cfg, split)
    return [(start, min(n, start + cfg.shard_size)) for start in range(0, n, cfg.shard_size)]


# Shard names are relative to the world's root, "/"-separated; storage.join splits them per part.
def _shard_name(split: str, shard: int, fmt: str) -> str:
    # Parquet shards get their own folder: a source directory is read as one format (tars win, see
    # sources.list_shards), so both formats side by side would hide the Parquet copy.
    folder = f"{split}/parquet" if fmt == "parquet" else split
    return f"{folder}/{split}-{shard:05d}{_FORMAT_SUFFIX[fmt]}"


def _zeroshot_shard_name(task: str, shard: int) -> str:
    # clip_benchmark's webdataset layout: <dataset>/<split>/{0..n-1}.tar, split "test".
    return f"zeroshot/{task}/test/{shard}.tar"


def _samples(cfg: SynthConfig, split: str, start: int, stop: int) -> Iterator[SourceSample]:
    for index in range(start, stop):
        yield make_sample(cfg, split, index)


def _write_shard(cfg: SynthConfig, split: str, shard: int, start: int, stop: int) -> list[str]:
    """Renders one shard of a split and writes it in every format; returns the written paths (relative)."""
    samples = list(_samples(cfg, split, start, stop))
    written = []
    if split == "zeroshot":
        for task in families.family(cfg.family).tasks:
            name = _zeroshot_shard_name(task, shard)
            members = ((s.key, {"jpg": s.image_bytes, "cls": str(s.meta["labels"][task]).encode()}) for s in samples)
            count = write_tar_shard(storage.join(cfg.output, *name.split("/")), members)
            assert count == len(samples), (name, count, len(samples))
            written.append(name)
        return written
    samples = [dataclasses.replace(s, image=None) for s in samples]  # writers need bytes only
    for fmt in cfg.formats:
        name = _shard_name(split, shard, fmt)
        writer = write_webdataset_shard if fmt == "webdataset" else write_parquet_shard
        count = writer(storage.join(cfg.output, *name.split("/")), samples)
        assert count == len(samples), (name, count, len(samples))
        written.append(name)
    return written


def _world_identity(cfg: SynthConfig) -> dict[str, Any]:
    """What decides the world's content: the config minus where it goes and how fast it is made."""
    identity = to_dict(cfg)
    identity.pop("output")
    identity.pop("workers")
    if identity["family"] == families.DEFAULT:  # worlds of the first family predate families: same identity
        identity.pop("family")
    return {"world_version": WORLD_VERSION, "config": identity}


def _read_marker(cfg: SynthConfig) -> dict[str, Any] | None:
    uri = storage.join(cfg.output, "world.json")
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (ValueError, OSError):
        return None


def _remove_stale(cfg: SynthConfig, written: set[str]) -> int:
    """Deletes shards under the world's own folders that this generation did not write."""
    removed = 0
    for folder in ("teacher", "student", "retrieval", "zeroshot"):
        root = storage.join(cfg.output, folder)
        for uri in storage.list_files(root, suffixes=(".tar", ".parquet", ".txt"), recursive=True):
            rel = folder + "/" + uri[len(root) :].lstrip("/").replace(os.sep, "/")
            if rel not in written:
                storage.delete(uri)
                removed += 1
    return removed


def _worker_count(cfg: SynthConfig, num_jobs: int) -> int:
    workers = cfg.workers or os.cpu_count() or 1
    return max(1, min(workers, num_jobs))


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``synth`` stage: `generate` of ``cfg.synth``; returns its summary."""
    return generate(cfg.synth, progress=log)


def generate(cfg: SynthConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Writes the whole world under ``cfg.output`` (see the module docstring) unless it is already there.

    Args:
        cfg: The world's config.
        progress: Called with a one-line message as shards complete.

    Returns:
        The contents of ``world.json`` plus ``"cached"``: True when an identical world was already
        complete and nothing was written.
    """
    validate_config(cfg)
    report = progress or (lambda message: None)
    identity = _world_identity(cfg)
    marker = _read_marker(cfg)
    if marker is not None and {k: marker.get(k) for k in identity} == identity:
        report(f"synthetic world at {cfg.output} is up to date; nothing to do")
        return {**marker, "cached": True}

    # Drop the old marker first: a world interrupted from here on is never mistaken for a complete one.
    storage.delete(storage.join(cfg.output, "world.json"))
    started = time.perf_counter()
    jobs = [
        (split, shard, start, stop) for split in SPLITS for shard, (start, stop) in enumerate(_shard_ranges(cfg, split))
    ]
    total = sum(split_size(cfg, split) for split in SPLITS)
    written: set[str] = set()
    done = 0
    next_report = 0.0

    def finished(job: tuple[str, int, int, int], names: list[str]) -> None:
        nonlocal done, next_report
        written.update(names)
        done += job[3] - job[2]
        if done >= next_report or done == total:  # about ten lines per world, whatever its size
            rate = done / max(time.perf_counter() - started, 1e-9)
            report(f"synthetic world: {done}/{total} samples ({job[0]} shard {job[1]} done), {rate:.0f} samples/s")
            next_report = done + total / 10

    workers = _worker_count(cfg, len(jobs))
    if workers == 1:
        for job in jobs:
            finished(job, _write_shard(cfg, *job))
    else:
        # spawn, not fork: a forked child would inherit the parent's S3 clients and threads.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_write_shard, cfg, *job): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())

    family = families.family(cfg.family)
    classnames = zeroshot_tasks(family)
    num_zeroshot_shards = len(_shard_ranges(cfg, "zeroshot"))
    if num_zeroshot_shards:
        for task in family.tasks:
            texts = {
                "classnames.txt": "\n".join(classnames[task]) + "\n",
                "zeroshot_classification_templates.txt": "\n".join(family.zeroshot_templates[task]) + "\n",
                "test/nshards.txt": f"{num_zeroshot_shards}\n",
            }
            for name, text in texts.items():
                rel = f"zeroshot/{task}/{name}"
                storage.write_bytes(storage.join(cfg.output, *rel.split("/")), text.encode())
                written.add(rel)
    removed = _remove_stale(cfg, written)

    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        **identity,
        "code_version": clipdr.__version__,
        "output": cfg.output,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "splits": {
            split: {
                "count": split_size(cfg, split),
                "num_shards": len(_shard_ranges(cfg, split)),
                "formats": ["webdataset"] if split == "zeroshot" else list(cfg.formats),
            }
            for split in SPLITS
        },
        "zeroshot_tasks": {
            task: {"classnames": list(classnames[task]), "templates": list(family.zeroshot_templates[task])}
            for task in family.tasks
        },
        "seconds": round(elapsed, 2),
        "samples_per_second": round(total / max(elapsed, 1e-9), 1),
    }
    storage.write_bytes(storage.join(cfg.output, "world.json"), json.dumps(summary, indent=2).encode())
    report(
        f"synthetic world written to {cfg.output}: {total} samples in {elapsed:.1f} s"
        + (f" ({removed} stale shards removed)" if removed else "")
    )
    return {**summary, "cached": False}
