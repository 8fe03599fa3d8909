"""Food-101 features: a pretrained BERT and ViT, run once, their token features cached.

The models never see raw text or pixels: :func:`extract_features` runs a pretrained BERT and
a pretrained ViT, given as LOCAL folders saved with ``save_pretrained``, once, and caches
per split the text token features ``[N, text_tokens, D]`` and image token features
``[N, 1 + k*k, D]`` (CLS + the patch grid average-pooled to ``k x k``) in float16 under
``<cache_dir>/<key>/`` (default ``<root>/features/<key>/``). :func:`load_food101` turns a
cache into a :class:`~multimodal_general.datasets.task_data.TaskData`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multimodal_general.datasets.food101.records import (
    MODALITIES,
    SPLIT_FILES,
    Food101Split,
    read_food101,
)
from multimodal_general.datasets.task_data import SequenceSplit, TaskData
from multimodal_general.errors import BadDataFile, ConfigurationError
from multimodal_general.io import atomic_folder, atomic_write_text

CACHE_FORMAT = 1
MANIFEST = "manifest.json"

Progress = Callable[[int, int], object]


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FeatureSettings:
    """What the cached features depend on besides the models and the data."""

    text_tokens: int = 64
    image_tokens: str = "cls+grid4"

    def __post_init__(self) -> None:
        if not isinstance(self.text_tokens, int) or not 2 <= self.text_tokens <= 4096:
            raise ConfigurationError(
                f"text_tokens must be an integer in [2, 4096], got {self.text_tokens!r}"
            )
        if _grid_size(self.image_tokens) is None and self.image_tokens != "all":
            raise ConfigurationError(
                "image_tokens must be 'all' or 'cls+gridK' (e.g. 'cls+grid4'), "
                f"got {self.image_tokens!r}"
            )

    def as_dict(self) -> dict:
        return {"text_tokens": self.text_tokens, "image_tokens": self.image_tokens}


def _grid_size(image_tokens: str) -> int | None:
    """``"cls+gridK"`` -> ``K`` (1..32); anything else -> None."""
    match = re.fullmatch(r"cls\+grid(\d+)", str(image_tokens))
    if match and 1 <= int(match.group(1)) <= 32:
        return int(match.group(1))
    return None


# ----------------------------------------------------------------------------- digests

_TEXT_SUFFIXES = (".json", ".txt", ".model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_CHUNK = 1 << 20


def model_digest(folder: str | Path, role: str) -> str:
    """A short digest of a saved model folder: its config/tokenizer files in full, its
    weight files by size and their first and last MiB (cheap for large checkpoints)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BadDataFile(folder, f"no such folder (expected a {role} saved with save_pretrained)")
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES)]
    if not (folder / "config.json").is_file() or not weights:
        raise BadDataFile(folder, f"not a saved {role}: needs config.json and a weights file")
    for path in files:
        if path.name.endswith(_TEXT_SUFFIXES):
            digest.update(f"{path.name}\0".encode() + path.read_bytes())
        elif path in weights:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode() + _head_tail(path))
    return digest.hexdigest()[:16]


def _head_tail(path: Path) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(_CHUNK)
        size = path.stat().st_size
        if size <= 2 * _CHUNK:
            return head + handle.read()
        handle.seek(size - _CHUNK)
        return head + handle.read()


def data_digest(root: str | Path) -> str:
    """A short digest of the three split files' contents (the cache follows the data)."""
    digest = hashlib.sha256()
    for name in SPLIT_FILES.values():
        path = Path(root) / name
        if not path.is_file():
            raise BadDataFile(path, "no such file")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_key(bert_digest: str, vit_digest: str, settings: FeatureSettings, data: str) -> str:
    """The cache folder's name: a digest of both models, the settings and the data."""
    text = json.dumps(
        {"format": CACHE_FORMAT, "bert": bert_digest, "vit": vit_digest, "data": data,
         "settings": settings.as_dict()},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- models


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0].strip() if text else type(error).__name__
    return line[:200]


def _load_models(bert: Path, vit: Path, device: torch.device):
    """``(tokenizer, text model, image processor, image model)`` from local folders only."""
    try:
        transformers = quiet_transformers()
    except ImportError:
        raise ConfigurationError(
            "Food-101 feature extraction needs transformers: pip install '.[food]'"
        ) from None
    loaded = []
    for folder, role, loaders in (
        (bert, "BERT model with its tokenizer",
         (transformers.AutoTokenizer, transformers.AutoModel)),
        (vit, "ViT model with its image processor",
         (transformers.AutoImageProcessor, transformers.AutoModel)),
    ):
        for loader in loaders:
            try:
                loaded.append(loader.from_pretrained(str(folder), local_files_only=True))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise BadDataFile(folder, f"not a saved {role} ({_first_line(error)})") from None
    tokenizer, text_model, processor, image_model = loaded
    return tokenizer, text_model.to(device).eval(), processor, image_model.to(device).eval()


def _text_features(
    tokenizer, model, texts: list[str], steps: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """``[B, steps, D]`` float16 last hidden states (zero on padding) and the attention mask."""
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=steps, return_tensors="pt"
    )
    encoded = {k: v.to(device) for k, v in encoded.items()}
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].bool()
    hidden = hidden * mask[..., None]
    return hidden.float().cpu().numpy().astype(np.float16), mask.cpu().numpy()


def _read_image(path: Path):
    """An RGB PIL image; an unreadable file is a :class:`BadDataFile`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise BadDataFile(path, f"cannot read image ({_first_line(error)})") from None


def _image_features(processor, model, paths: list[Path], grid: int | None, device) -> np.ndarray:
    """``[B, 1 + grid*grid, D]`` (CLS + pooled patch grid) or every token when ``grid`` is None."""
    pixels = processor(images=[_read_image(p) for p in paths], return_tensors="pt")["pixel_values"]
    output = model(pixel_values=pixels.to(device))
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None or hidden.dim() != 3:
        raise ConfigurationError("the image model gives no token sequence (last_hidden_state)")
    if grid is not None:
        hidden = _pool_grid(hidden, pixels.shape[-2:], model.config, grid)
    return hidden.float().cpu().numpy().astype(np.float16)


def _pool_grid(hidden: torch.Tensor, size, config, grid: int) -> torch.Tensor:
    """CLS token + the patch tokens (the last h*w ones) average-pooled to ``grid x grid``."""
    patch = getattr(config, "patch_size", None)
    if not patch:
        raise ConfigurationError(
            "the image model's config has no patch_size: use image_tokens='all'"
        )
    patch = patch if isinstance(patch, int) else patch[0]
    rows, cols = int(size[0]) // patch, int(size[1]) // patch
    if rows * cols >= hidden.shape[1]:
        raise ConfigurationError(f"expected a CLS token before {rows}x{cols} patch tokens, got "
                                 f"{hidden.shape[1]} tokens: use image_tokens='all'")
    patches = hidden[:, -rows * cols:].reshape(len(hidden), rows, cols, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)
    return torch.cat([hidden[:, :1], pooled], dim=1)


# ----------------------------------------------------------------------------- the cache


def _features_dir(root: Path, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else root / "features"


def _split_files(split: str) -> dict[str, str]:
    return {
        "text": f"{split}_text.npy",
        "text_mask": f"{split}_text_mask.npy",
        "image": f"{split}_image.npy",
        "target": f"{split}_target.npy",
        "ids": f"{split}_ids.json",
    }


def _valid_cache(folder: Path) -> dict | None:
    """The manifest of a complete cache folder, else None (never raises on a bad cache)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != CACHE_FORMAT:
            return None
        for split, info in manifest["splits"].items():
            files = _split_files(split)
            n = info["samples"]
            shapes = {"text": (n, *info["text_shape"]), "text_mask": (n, info["text_shape"][0]),
                      "image": (n, *info["image_shape"]), "target": (n,)}
            for name, shape in shapes.items():
                if np.load(folder / files[name], mmap_mode="r").shape != tuple(shape):
                    return None
            if not (folder / files["ids"]).is_file():
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def extract_features(
    root: str | Path,
    bert: str | Path,
    vit: str | Path,
    cache_dir: str | Path | None = None,
    *,
    text_tokens: int = 64,
    image_tokens: str = "cls+grid4",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> Path:
    """Run BERT and ViT over every split once and cache their token features; return the
    cache folder ``<cache_dir or root/features>/<key>/``. A valid cache is reused.

    ``progress(done, total)`` is called after every batch, counting samples over all splits.
    """
    settings = FeatureSettings(text_tokens, image_tokens)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")
    bert, vit = Path(bert).expanduser().resolve(), Path(vit).expanduser().resolve()
    root = Path(root).expanduser().resolve()
    models = {"bert": {"path": str(bert), "digest": model_digest(bert, "BERT model")},
              "vit": {"path": str(vit), "digest": model_digest(vit, "ViT model")}}
    data = data_digest(root)
    key = cache_key(models["bert"]["digest"], models["vit"]["digest"], settings, data)
    target = _features_dir(root, cache_dir) / key
    if _valid_cache(target) is not None:
        return target
    records = read_food101(root)
    manifest = {"format": CACHE_FORMAT, "key": key, "models": models,
                "settings": settings.as_dict(), "data": data, "classes": list(records.classes)}
    device = torch.device(device)
    loaded = _load_models(bert, vit, device)
    limit = getattr(loaded[1].config, "max_position_embeddings", None)
    if limit is not None and text_tokens > limit:
        raise ConfigurationError(
            f"text_tokens={text_tokens} exceeds the BERT model's {limit} positions"
        )
    return _write_cache(target, records, loaded, settings, manifest, batch_size, device, progress)


def _write_cache(target, records, loaded, settings, manifest, batch_size, device, progress) -> Path:
    """Extract into a temporary folder beside ``target``, then rename it into place."""
    def fill(tmp: Path) -> None:
        total = sum(len(split) for split in records.splits.values())
        done = 0
        manifest["splits"] = {}
        for name, split in records.splits.items():
            for count in _extract_split(tmp, name, split, loaded, settings, batch_size, device):
                done += count
                if progress is not None:
                    progress(done, total)
            manifest["splits"][name] = _split_info(tmp, name, len(split))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    return atomic_folder(target, fill, place=_replace_folder, what="the feature cache")


def _split_info(folder: Path, split: str, n: int) -> dict:
    files = _split_files(split)
    text = np.load(folder / files["text"], mmap_mode="r")
    image = np.load(folder / files["image"], mmap_mode="r")
    return {"samples": n, "text_shape": list(text.shape[1:]), "image_shape": list(image.shape[1:])}


def _extract_split(
    folder: Path, name: str, split: Food101Split, loaded, settings, batch_size, device
) -> Iterator[int]:
    """Write one split's ``.npy`` files batch by batch (memory-mapped); yield each batch size."""
    tokenizer, text_model, processor, image_model = loaded
    files = _split_files(name)
    grid = _grid_size(settings.image_tokens)
    n = len(split)
    np.save(folder / files["target"], split.labels)
    atomic_write_text(folder / files["ids"], json.dumps(split.ids))
    text = mask = image = None
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            t, m = _text_features(tokenizer, text_model, split.texts[start:stop],
                                  settings.text_tokens, device)
            v = _image_features(processor, image_model, split.images[start:stop], grid, device)
            if text is None:
                text = _open(folder / files["text"], (n, *t.shape[1:]), np.float16)
                mask = _open(folder / files["text_mask"], (n, t.shape[1]), np.bool_)
                image = _open(folder / files["image"], (n, *v.shape[1:]), np.float16)
            text[start:stop], mask[start:stop], image[start:stop] = t, m, v
            yield stop - start
    if n == 0:  # an empty split still gets (empty) files of the right rank
        for key, shape, dtype in (("text", (0, settings.text_tokens, 0), np.float16),
                                  ("text_mask", (0, settings.text_tokens), np.bool_),
                                  ("image", (0, 0, 0), np.float16)):
            np.save(folder / files[key], np.zeros(shape, dtype))
        return
    for array in (text, mask, image):
        array.flush()
    del text, mask, image


def _open(path: Path, shape: tuple[int, ...], dtype) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _replace_folder(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, first removing an invalid old ``target``; if another
    process has meanwhile put a valid cache there, keep that one."""
    if target.exists():
        if _valid_cache(target) is not None:
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if _valid_cache(target) is None:
            raise


# ----------------------------------------------------------------------------- loading

_EXTRACT_SETTINGS = ("text_tokens", "image_tokens", "batch_size", "device", "progress")


def load_food101(
    root: str | Path,
    bert: str | Path | None = None,
    vit: str | Path | None = None,
    cache_dir: str | Path | None = None,
    **settings,
) -> TaskData:
    """Food-101 as a :class:`TaskData` (task ``"food101"``, modalities ``text``, ``image``).

    With ``bert`` and ``vit``: extracts (or reuses) the features for these models and
    ``settings`` (the keyword arguments of :func:`extract_features`). Without them: uses the
    one cache made for this data and these settings, or raises :class:`ConfigurationError`.
    """
    root = Path(root).expanduser().resolve()
    unknown = set(settings) - set(_EXTRACT_SETTINGS)
    if unknown:
        raise ConfigurationError(f"unknown Food-101 settings: {sorted(unknown)}")
    if (bert is None) != (vit is None):
        raise ConfigurationError(
            "Food-101: give both --bert and --vit, or neither (to use cached features)"
        )
    if bert is not None:
        folder = extract_features(root, bert, vit, cache_dir, **settings)
        manifest = _valid_cache(folder)
    else:
        folder, manifest = _find_cache(root, cache_dir, settings)
    return _task_from_cache(root, folder, manifest)


def _find_cache(root: Path, cache_dir, settings: dict) -> tuple[Path, dict]:
    """The single valid cache for this data and these settings (any models)."""
    wanted = FeatureSettings(settings.get("text_tokens", 64),
                             settings.get("image_tokens", "cls+grid4")).as_dict()
    data = data_digest(root)
    parent = _features_dir(root, cache_dir)
    found = []
    for folder in sorted(parent.iterdir()) if parent.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        manifest = _valid_cache(folder)
        if manifest and manifest.get("settings") == wanted and manifest.get("data") == data:
            found.append((folder, manifest))
    if not found:
        raise ConfigurationError(
            f"{root}: no cached features for {wanted} in {parent}; give --bert and --vit "
            "(local model folders) to extract them"
        )
    if len(found) > 1:
        raise ConfigurationError(
            f"{parent}: {len(found)} cached feature sets fit {wanted} (different models); "
            "give --bert and --vit to choose"
        )
    return found[0]


def _task_from_cache(root: Path, folder: Path, manifest: dict) -> TaskData:
    splits = {name: _load_split(folder, name) for name in manifest["splits"]}
    return TaskData(
        task="food101",
        kind="classification",
        modalities=MODALITIES,
        splits=splits,
        classes=tuple(manifest["classes"]),
        source=root,
        details={"features": str(folder), "models": manifest["models"],
                 "settings": manifest["settings"]},
    )


def _load_split(folder: Path, split: str) -> SequenceSplit:
    """float16 tensors as cached (the encoders compute in float32: half the memory of the real
    data set in float32, ~7 GB instead of ~15 GB at the default settings); the image mask is all True."""
    files = _split_files(split)
    text = torch.from_numpy(np.array(np.load(folder / files["text"]), dtype=np.float16))
    mask = torch.from_numpy(np.array(np.load(folder / files["text_mask"]), dtype=bool))
    image = torch.from_numpy(np.array(np.load(folder / files["image"]), dtype=np.float16))
    target = torch.from_numpy(np.array(np.load(folder / files["target"]), dtype=np.int64))
    ids = json.loads((folder / files["ids"]).read_text(encoding="utf-8"))
    image_mask = torch.ones(image.shape[:2], dtype=torch.bool)
    return SequenceSplit({"text": text, "image": image}, {"text": mask, "image": image_mask},
                         target, ids)


def quiet_transformers():
    """``transformers``, quiet: no progress bars for saving shards, no backend notices (errors
    still surface as exceptions)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers
