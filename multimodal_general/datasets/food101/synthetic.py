"""A small synthetic Food-101 in the official layout, with controllable class evidence.

Its words and images carry the evidence of :mod:`multimodal_general.datasets.latent_evidence`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from multimodal_general.datasets.food101.records import MODALITIES
from multimodal_general.datasets.latent_evidence import imbalanced_strengths, latent_evidence
from multimodal_general.errors import ConfigurationError, OutputError
from multimodal_general.io import atomic_folder, atomic_write_text

FOOD_NAMES = (
    "apple_pie", "baklava", "bibimbap", "bruschetta", "caesar_salad", "carrot_cake", "ceviche",
    "churros", "clam_chowder", "donuts", "dumplings", "falafel", "french_fries", "gnocchi",
    "guacamole", "hamburger", "hummus", "lasagna", "miso_soup", "nachos", "omelette", "pad_thai",
    "paella", "pancakes", "pho", "pizza", "ramen", "risotto", "samosa", "sushi", "tacos",
    "tiramisu", "waffles",
)
VOCABULARY = (
    "sweet", "salty", "sour", "bitter", "spicy", "crispy", "creamy", "tender", "smoky", "fresh",
    "baked", "fried", "grilled", "boiled", "roasted", "steamed", "sliced", "diced", "minced",
    "whisked", "butter", "sugar", "flour", "salt", "pepper", "garlic", "onion", "tomato", "cheese",
    "cream", "milk", "egg", "rice", "noodle", "bread", "dough", "beef", "pork", "chicken", "fish",
    "shrimp", "tofu", "lemon", "lime", "honey", "vinegar", "soy", "ginger", "basil", "cumin",
    "chili", "olive", "oil", "broth", "sauce", "nut", "apple", "berry", "chocolate", "vanilla",
    "bean", "corn", "potato", "mushroom",
)
_PATTERNS = 6


def write_synthetic_food101(
    root: str | Path,
    *,
    classes: int = 8,
    per_class: tuple[int, int, int] = (40, 10, 10),
    imbalance: float = 4.0,
    dominant: str = "text",
    strength: float = 2.0,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a small Food-101 in the official layout (JSON files + ``images/<split>/<class>/``).

    Words are drawn from :data:`VOCABULARY` with probabilities ``softmax(latent @ W)`` and
    images are sums of fixed colour gratings weighted by the image latent, plus pixel noise;
    ``dominant`` gets ``strength``, the other modality ``strength / imbalance``. The folder
    is built beside ``root`` and renamed into place; ``root`` must not exist (or be empty).
    """
    if not 2 <= classes <= len(FOOD_NAMES):
        raise ConfigurationError(f"classes must be in [2, {len(FOOD_NAMES)}], got {classes}")
    if len(per_class) != 3 or min(per_class) < 1:
        raise ConfigurationError(
            f"per_class must be 3 positive counts (train, dev, test), got {per_class}"
        )
    if not 8 <= image_size <= 1024:
        raise ConfigurationError(f"image_size must be in [8, 1024], got {image_size}")
    strengths = imbalanced_strengths(MODALITIES, dominant, strength, imbalance)
    root = Path(root).expanduser().resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OutputError(f"{root}: already exists and is not an empty folder")
    names = tuple(sorted(FOOD_NAMES[:classes]))
    return atomic_folder(root, lambda tmp: _write_splits(tmp, names, per_class, strengths, image_size, seed))


def _write_splits(folder: Path, names, per_class, strengths, image_size: int, seed: int) -> None:
    """Draw every split's targets and latents (one fixed world) and write files and images."""
    rng = np.random.default_rng(seed)
    world_seed = seed + 7919
    words = np.random.default_rng(world_seed + 1).standard_normal((8, len(VOCABULARY)))
    gratings = _gratings(np.random.default_rng(world_seed + 2), image_size)
    counter = dict.fromkeys(names, 0)
    for split, count in zip(("train", "dev", "test"), per_class, strict=True):
        target, latents = _balanced_evidence(len(names), count, strengths, rng, world_seed)
        entries = []
        for i, y in enumerate(target):
            label = names[y]
            file = f"{label}_{counter[label]}.jpg"
            counter[label] += 1
            img_path = f"images/{split}/{label}/{file}"
            tokens = _draw_words(latents["text"][i], words, rng)
            _write_image(folder / img_path, _draw_image(latents["image"][i], gratings, rng))
            entries.append({"id": f"{label}_{file}", "text_tokens": tokens,
                            "img_path": img_path, "label": label})
        atomic_write_text(folder / f"{split}.json", json.dumps(entries))


def _balanced_evidence(classes: int, per_class: int, strengths, rng, world_seed: int):
    """Exactly ``per_class`` samples of every class (shuffled), by selecting from draws of
    :func:`latent_evidence` made with the same world."""
    chosen: dict[int, list[tuple[int, dict]]] = {c: [] for c in range(classes)}
    while min(len(v) for v in chosen.values()) < per_class:
        world = np.random.default_rng(world_seed)
        target, latents = latent_evidence("classification", 2 * classes * per_class, strengths,
                                          rng, world, classes=classes)
        for i, y in enumerate(target):
            if len(chosen[int(y)]) < per_class:
                chosen[int(y)].append((int(y), {m: v[i] for m, v in latents.items()}))
    samples = [s for c in range(classes) for s in chosen[c]]
    order = rng.permutation(len(samples))
    target = np.array([samples[i][0] for i in order], dtype=np.int64)
    latents = {m: np.stack([samples[i][1][m] for i in order]) for m in strengths}
    return target, latents


def _draw_words(latent: np.ndarray, words: np.ndarray, rng: np.random.Generator) -> list[str]:
    """12 to 40 words, each drawn with probabilities ``softmax(latent @ words / sqrt(dim))``."""
    logits = latent @ words / math.sqrt(len(latent))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [VOCABULARY[k] for k in rng.choice(len(VOCABULARY), size=rng.integers(12, 41), p=p)]


def _gratings(world: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed patterns ``[P, size, size]`` (oriented sine gratings) and colours ``[8, P, 3]``."""
    y, x = np.mgrid[0:size, 0:size] / size
    angles = world.uniform(0, np.pi, _PATTERNS)
    freqs = world.uniform(1.0, 4.0, _PATTERNS)
    patterns = np.stack([np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)))
                         for a, f in zip(angles, freqs, strict=True)])
    mixing = world.standard_normal((8, _PATTERNS, 3)) / math.sqrt(8)
    return patterns, mixing


def _draw_image(latent: np.ndarray, gratings, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [size, size, 3]``: grey + latent-weighted colour gratings + pixel noise."""
    patterns, mixing = gratings
    weights = np.einsum("l,lpc->pc", latent, mixing)  # [P, 3]
    image = 0.5 + 0.08 * np.einsum("pc,pyx->yxc", np.tanh(weights), patterns)
    image = image + 0.1 * np.tanh(weights.mean(0))  # an overall colour cast
    image = image + 0.05 * rng.standard_normal(image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _write_image(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=92)
