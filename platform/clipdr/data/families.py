"""The built-in world families of `clipdr synth` (``synth.family``): what scenes are made of and how captions say them.

A family is data: its objects' shapes, colours, sizes and fills, the grid of positions, the backgrounds, the
phrasings of clean captions, the vocabulary of its web noise, and its zero-shot tasks. `clipdr.data.synthetic`
samples, renders and captions any family with the same code, so the demo's claim can be checked on a world it was
not tuned on.

- ``shapes`` (the default, the demo's world): eight shapes in eight saturated colours, two sizes, a 3x3 grid, six
  muted backgrounds with five textures; seven zero-shot tasks, ``object`` ("<colour> <shape>", 64 classes) first.
- ``tiles``: six other shapes (pentagon, arrow, crescent, bar, oval, chevron) in six other colours, solid or hollow,
  three sizes, a 2x2 grid, six other backgrounds with four other textures (gradients, grids, speckles); captions in
  other phrasings, and noisy captions that read like marketplace listings and name colours by everyday synonyms
  ("dark red" for maroon); eight zero-shot tasks, ``fill`` among them.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]

# Zero-shot tasks a family may have, each one attribute of a single-object scene; "object" is "<colour> <shape>".
TASK_ATTRIBUTES = ("object", "shape", "colour", "fill", "size", "position", "background", "texture")


@dataclass(frozen=True, eq=False)
class Family:
    """One world family's vocabulary. Names of shapes and textures are unique across families (the renderer draws
    them by name); object and background colour names are disjoint within a family."""

    name: str
    shapes: tuple[str, ...]
    round_shapes: tuple[str, ...]  # drawn without rotation
    colours: dict[str, RGB]
    sizes: dict[str, float]  # size name -> object extent as a fraction of the image side
    fills: tuple[str, ...]  # ("solid",): the family has no fill attribute, and captions never say one
    grid: int  # positions are the cells of a grid x grid layout, in reading order
    position_phrases: dict[str, str]  # position -> how clean captions say it (no phrase contains another)
    background_colours: dict[str, RGB]
    textures: tuple[str, ...]
    nouns: tuple[str, ...]  # how clean captions count objects ("two shapes")
    generic_noun: str  # what a noisy caption says instead of a dropped shape name, and counts with
    # Clean captions: (object phrase, caption) format pairs, one drawn per caption. The object phrase has {size}
    # {fill} {colour} {shape} {position}; the caption has {count}, {texture}, {background}, {objects_and} (the
    # object phrases joined with "and") and {objects_semi} (joined with "; ").
    caption_styles: tuple[tuple[str, str], ...]
    fillers: tuple[str, ...]  # web filler of noisy captions: no attribute word of the family
    irrelevant: tuple[str, ...]  # captions unrelated to the image
    colour_synonyms: dict[str, tuple[str, ...]]  # everyday names noisy captions use instead of a colour's own
    synonym_rate: float  # probability that a noisy caption says a stated colour by a synonym
    zeroshot_templates: dict[str, tuple[str, ...]]  # task (a TASK_ATTRIBUTES name) -> prompt templates with {c}

    @property
    def positions(self) -> tuple[str, ...]:
        return tuple(self.position_phrases)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.zeroshot_templates)


def _check(family: Family) -> Family:
    """Internal invariants of a family's data, checked once at import."""
    assert len(family.position_phrases) == family.grid**2, family.name
    assert not set(family.colours) & set(family.background_colours), family.name
    assert set(family.tasks) <= set(TASK_ATTRIBUTES) and family.tasks[0] == "object", family.name
    assert ("fill" in family.tasks) == (len(family.fills) > 1), family.name
    assert set(family.colour_synonyms) <= set(family.colours), family.name
    assert max(family.sizes.values()) < 1 / family.grid, family.name  # an object fits its cell
    return family


SHAPES = _check(
    Family(
        name="shapes",
        shapes=("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring"),
        round_shapes=("circle", "ring"),
        # Saturated object colours; backgrounds use a disjoint, muted palette so the two never share a name.
        colours={
            "red": (220, 30, 35),
            "orange": (250, 135, 15),
            "yellow": (245, 225, 30),
            "green": (35, 175, 60),
            "cyan": (30, 205, 225),
            "blue": (35, 75, 230),
            "purple": (140, 50, 205),
            "pink": (250, 120, 200),
        },
        # Large objects nearly fill a grid cell (1/3 of the side) so that shapes stay recognisable at 32 px; small
        # ones are half their area.
        sizes={"small": 0.22, "large": 0.32},
        fills=("solid",),
        grid=3,
        position_phrases={
            "top left": "in the top left",
            "top": "at the top",
            "top right": "in the top right",
            "left": "on the left",
            "center": "in the center",
            "right": "on the right",
            "bottom left": "in the bottom left",
            "bottom": "at the bottom",
            "bottom right": "in the bottom right",
        },
        background_colours={
            "white": (232, 232, 226),
            "black": (32, 32, 34),
            "gray": (125, 125, 125),
            "beige": (205, 190, 155),
            "brown": (105, 78, 58),
            "olive": (105, 110, 68),
        },
        textures=("plain", "striped", "dotted", "checkered", "grainy"),
        nouns=("shape", "object"),
        generic_noun="shape",
        caption_styles=(
            ("a {size} {colour} {shape} {position}", "{count} on a {texture} {background} background: {objects_and}."),
            (
                "a {size} {colour} {shape} {position}",
                "{objects_and}, on a {texture} {background} background ({count} in total).",
            ),
            (
                "a {size} {colour} {shape} {position}",
                "a {background} {texture} background with {count}: {objects_and}.",
            ),
            (
                "{position} a {size} {colour} {shape}",
                "an image of {count}. {objects_semi}. the background is {background} and {texture}.",
            ),
            (
                "{position} a {size} {colour} {shape}",
                "{count} ({objects_semi}) on a {texture} {background} background.",
            ),
        ),
        fillers=(
            "stock photo",
            "free download",
            "hd wallpaper",
            "png",
            "#design",
            "#art",
            "vector illustration",
            "clipart",
            "royalty free",
            "icon",
            "logo template",
            "high resolution",
            "4k",
            "jpg",
            "for kids",
            "#minimal",
            "graphic",
            "isolated",
            "editable",
            "image",
        ),
        irrelevant=(
            "best deals on shoes",
            "click here to subscribe",
            "home page banner",
            "untitled-1",
            "our team at the annual meeting",
            "summer sale 50% off",
            "wedding invitation template",
            "cute puppy playing in the park",
            "delicious pasta recipe",
            "modern living room interior",
            "product thumbnail",
            "placeholder",
            "map of europe",
            "company logo",
            "loading",
            "profile picture",
            "sunset over the mountains",
            "download our app",
        ),
        colour_synonyms={},
        synonym_rate=0.0,
        zeroshot_templates={
            "object": (
                "a photo of a {c}.",
                "a {c}.",
                "an image of a {c}.",
                "a {c} on a background.",
                "a drawing of a {c}.",
            ),
            "shape": ("a photo of a {c}.", "a {c}.", "an image of a {c} shape.", "a drawing of a {c}."),
            "colour": ("a photo of a {c} shape.", "a {c} object.", "an image of something {c}.", "a {c} shape."),
            "size": ("a photo of a {c} shape.", "a {c} object.", "an image of a {c} shape."),
            "position": ("a photo of a shape {c}.", "an object {c}.", "an image with a shape {c}."),
            "background": ("a shape on a {c} background.", "a photo with a {c} background.", "an object on {c}."),
            "texture": ("a shape on a {c} background.", "a photo with a {c} background.", "a {c} background."),
        },
    )
)

TILES = _check(
    Family(
        name="tiles",
        shapes=("pentagon", "arrow", "crescent", "bar", "oval", "chevron"),
        round_shapes=(),
        colours={
            "maroon": (128, 20, 40),
            "teal": (0, 140, 135),
            "gold": (230, 180, 20),
            "navy": (25, 35, 120),
            "lime": (150, 230, 40),
            "magenta": (225, 30, 190),
        },
        # A 2x2 grid: cells are half the side, so objects are bigger than the first family's and come in three sizes.
        sizes={"tiny": 0.2, "medium": 0.3, "huge": 0.42},
        fills=("solid", "hollow"),
        grid=2,
        position_phrases={
            "upper left": "at upper left",
            "upper right": "at upper right",
            "lower left": "at lower left",
            "lower right": "at lower right",
        },
        background_colours={
            "cream": (235, 225, 200),
            "slate": (90, 100, 115),
            "charcoal": (45, 45, 50),
            "sand": (195, 170, 120),
            "mint": (170, 215, 185),
            "lavender": (185, 170, 215),
        },
        textures=("plain", "gradient", "gridded", "speckled"),
        nouns=("tile", "piece"),
        generic_noun="tile",
        caption_styles=(
            (
                "a {size} {fill} {colour} {shape} {position}",
                "{count} over a {texture} {background} backdrop: {objects_and}.",
            ),
            (
                "{position}, a {size} {fill} {colour} {shape}",
                "{objects_semi}; {count} on {texture} {background}.",
            ),
            (
                "a {fill} {colour} {shape}, {size}, {position}",
                "a {texture} {background} backdrop, {count}: {objects_and}.",
            ),
            (
                "a {size} {colour} {shape}, {fill}, {position}",
                "{count} ({objects_semi}) over {background}, {texture}.",
            ),
        ),
        fillers=(
            "sticker",
            "decal",
            "free shipping",
            "vinyl",
            "set of 10",
            "wall art",
            "printable",
            "laser cut",
            "enamel pin",
            "#etsy",
            "svg",
            "dxf",
            "custom order",
            "handmade",
            "gift idea",
            "on sale",
            "bulk pack",
            "sku 4471",
            "new listing",
            "ships in 24h",
        ),
        irrelevant=(
            "shipping policy",
            "seller rating 4.9 stars",
            "see all listings",
            "out of stock",
            "item photo 3 of 7",
            "thank you for your order",
            "returns accepted within 30 days",
            "customer reviews",
            "shop announcement",
            "follow our store",
            "gift card",
            "contact the seller",
            "frequently bought together",
            "size chart",
        ),
        colour_synonyms={
            "maroon": ("dark red", "burgundy"),
            "teal": ("blue green", "turquoise"),
            "gold": ("mustard", "golden"),
            "navy": ("dark blue", "midnight"),
            "lime": ("light green", "chartreuse"),
            "magenta": ("fuchsia", "hot pink"),
        },
        synonym_rate=0.3,
        zeroshot_templates={
            "object": ("a picture of a {c}.", "a {c} tile.", "a {c} on a backdrop.", "one {c}."),
            "shape": ("a picture of a {c}.", "a {c} tile.", "a tile shaped like a {c}."),
            "colour": ("a {c} tile.", "a picture of something {c}.", "a tile coloured {c}."),
            "fill": ("a {c} tile.", "a picture of a {c} piece.", "a {c} outline or shape."),
            "size": ("a {c} tile.", "a picture of a {c} piece.", "a {c} piece on a backdrop."),
            "position": ("a tile {c}.", "a picture with a piece {c}.", "one piece {c}."),
            "background": ("a tile over a {c} backdrop.", "a picture on {c}.", "a {c} backdrop."),
            "texture": ("a tile over a {c} backdrop.", "a picture on a {c} backdrop.", "a {c} backdrop."),
        },
    )
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SHAPES, TILES)}
DEFAULT = SHAPES.name


def family(name: str) -> Family:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown world family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
