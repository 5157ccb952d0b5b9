"""A synthetic, seeded VQA set drawn with Pillow (docs/vision.md §3): colours, shapes, counts, positions and short
printed words, each question from a couple of templates, each answer one word from a closed set.

Example i of a split is drawn from its own RNG, seeded by (split, seed, i): any example can be remade alone, the
splits never share an image, and the order is fixed. Question types cycle (i % 5), so every type is balanced.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("cat", "dog", "sun", "box", "car", "hat")
QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour is it?"),
    "shape": ("What shape is this?", "Name the shape."),
    "count": ("How many shapes are there?", "Count the shapes."),
    "position": ("Where is the shape?", "On which side is the shape?"),
    "word": ("What word is written?", "Read the word."),
}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS, "word": WORDS}
TYPES = tuple(QUESTIONS)


@dataclass
class VQAExample:
    image: Image.Image
    qtype: str
    question: str
    answer: str


def _background(rng: random.Random, size: int) -> Image.Image:
    tint = tuple(rng.randint(225, 255) for _ in range(3))
    return Image.new("RGB", (size, size), tint)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _place(rng: random.Random, size: int, side: int, area: tuple[int, int, int, int] | None = None):
    """A side x side box inside `area` (x0, y0, x1, y1 where the box's top-left may go; default anywhere)."""
    ax0, ay0, ax1, ay1 = area or (2, 2, size - side - 2, size - side - 2)
    x, y = rng.randint(ax0, ax1), rng.randint(ay0, ay1)
    return (x, y, x + side, y + side)


def _one_shape(rng: random.Random, size: int, area=None):
    """An image with a single shape; returns (image, shape, colour)."""
    image = _background(rng, size)
    shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
    side = rng.randint(size // 4, size * 7 // 16)
    _draw_shape(ImageDraw.Draw(image), shape, _place(rng, size, side, area and area(side)), COLOURS[colour])
    return image, shape, colour


def _count(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """1-4 small shapes, one per quadrant cell chosen at random, so they never overlap."""
    image = _background(rng, size)
    n = rng.randint(1, 4)
    half = size // 2
    draw = ImageDraw.Draw(image)
    for cell in rng.sample(range(4), n):
        side = rng.randint(size // 6, size // 4)
        x0, y0 = (cell % 2) * half, (cell // 2) * half
        box = _place(rng, size, side, (x0 + 2, y0 + 2, x0 + half - side - 2, y0 + half - side - 2))
        _draw_shape(draw, rng.choice(SHAPES), box, COLOURS[rng.choice(tuple(COLOURS))])
    return image, COUNTS[n - 1]


def _position(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One shape well inside one side's band (the other axis near the middle)."""
    where = rng.choice(POSITIONS)

    def area(side: int):
        low, high, mid = 1, size // 4 - side // 2, (size - side) // 2
        far = size - side - 1
        jitter = size // 8
        return {"left": (low, mid - jitter, max(low, high), mid + jitter),
                "right": (min(far, size - high - side), mid - jitter, far, mid + jitter),
                "top": (mid - jitter, low, mid + jitter, max(low, high)),
                "bottom": (mid - jitter, min(far, size - high - side), mid + jitter, far)}[where]

    image, _, _ = _one_shape(rng, size, area)
    return image, where


def _word(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    image = _background(rng, size)
    word = rng.choice(WORDS)
    font = ImageFont.load_default(size=rng.randint(size // 4, size * 5 // 16))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
    x = rng.randint(1, max(1, size - (x1 - x0) - 2)) - x0
    y = rng.randint(1, max(1, size - (y1 - y0) - 2)) - y0
    draw.text((x, y), word, font=font, fill=tuple(rng.randint(0, 80) for _ in range(3)))
    return image, word


def example(i: int, split: str = "train", seed: int = 0, size: int = 64) -> VQAExample:
    """Example i of `split` ("train" or "heldout"): an RGB size x size image, its question and one-word answer."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{split}-{seed}-{i}")  # str seeds hash with SHA-512: the same on every platform
    qtype = TYPES[i % len(TYPES)]
    if qtype in ("colour", "shape"):
        image, shape, colour = _one_shape(rng, size)
        answer = colour if qtype == "colour" else shape
    else:
        image, answer = {"count": _count, "position": _position, "word": _word}[qtype](rng, size)
    return VQAExample(image, qtype, rng.choice(QUESTIONS[qtype]), answer)


def majority_answers(n: int, seed: int = 0, size: int = 64) -> dict[str, str]:
    """The most frequent answer per question type over the first n training examples: the best a model without
    the image can do (the text-only baseline)."""
    counts: dict[str, Counter] = {t: Counter() for t in TYPES}
    for i in range(n):
        ex = example(i, "train", seed, size)
        counts[ex.qtype][ex.answer] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def accuracy_by_type(examples: list[VQAExample], right: list[bool]) -> dict[str, float]:
    """The share of examples answered right per question type, and "overall" (0 for a type with no example)."""
    hits, counts = Counter(), Counter()
    for ex, ok in zip(examples, right, strict=True):
        hits[ex.qtype] += bool(ok)
        counts[ex.qtype] += 1
    result = {t: hits[t] / max(counts[t], 1) for t in TYPES}
    result["overall"] = sum(hits.values()) / max(len(examples), 1)
    return result
