"""The on-disk layouts of BraTS data, and finding the cases in a folder.

* ``brats2021``: ``<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz`` (also BraTS 2018-2020 names)
* ``brats2023``: ``<id>/<id>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (BraTS-GLI 2023 and later)
* ``msd``: Medical Segmentation Decathlon Task01: ``dataset.json`` listing one 4-D image
  per case (channels named in its ``modality`` entry) and a label map

Every layout maps to the canonical sequence order ``flair, t1, t1ce, t2``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from brats_cggm import MODALITIES
from brats_cggm.errors import BadInputFile, ConfigurationError, InconsistentCase

NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass(frozen=True)
class Layout:
    name: str
    label_scheme: str
    #: canonical modality -> file suffix (per-sequence layouts only)
    suffixes: dict[str, str] = field(default_factory=dict)
    separator: str = "_"
    label_suffix: str = "seg"

    def file_name(self, case_id: str, part: str) -> str:
        """``part`` is a canonical modality or ``"seg"``."""
        suffix = self.label_suffix if part == "seg" else self.suffixes[part]
        return f"{case_id}{self.separator}{suffix}.nii.gz"

    def pattern(self) -> re.Pattern:
        parts = "|".join(sorted([*self.suffixes.values(), self.label_suffix], key=len, reverse=True))
        return re.compile(rf"^(?P<case>.+){re.escape(self.separator)}(?P<part>{parts})\.nii(\.gz)?$")


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("brats2021", "brats2021", dict(zip(MODALITIES, ("flair", "t1", "t1ce", "t2")))),
        Layout("brats2023", "brats2023", dict(zip(MODALITIES, ("t2f", "t1n", "t1c", "t2w"))), "-"),
        Layout("msd", "msd"),
    )
}

#: MSD ``modality`` names (lower-cased) -> canonical modality
MSD_CHANNEL_NAMES = {"flair": "flair", "t1w": "t1", "t1": "t1", "t1gd": "t1ce", "t1ce": "t1ce", "t2w": "t2", "t2": "t2"}


@dataclass(frozen=True)
class Case:
    """One case: its images in canonical order and its label map, if any.

    ``images`` holds four files (``flair, t1, t1ce, t2``) or, for ``msd``, one 4-D file
    whose channels ``channels`` lists in canonical order (``channels[i]`` is the channel
    index of ``MODALITIES[i]``). Only cases found for inference (``discover(...,
    partial=True)``) may lack sequences: ``None`` in their place.
    """

    case_id: str
    layout: str
    images: tuple[Path | None, ...]
    label: Path | None = None
    channels: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def label_scheme(self) -> str:
        return LAYOUTS[self.layout].label_scheme

    @property
    def files(self) -> tuple[Path, ...]:
        return (*(p for p in self.images if p is not None), *((self.label,) if self.label else ()))


@dataclass
class Discovery:
    """The cases found in a folder, and the problems that kept others from being cases."""

    layout: str
    cases: list[Case]
    problems: list[InconsistentCase | BadInputFile]


def _files(root: Path) -> list[Path]:
    """Every file under ``root``, following linked folders (each real folder once);
    hidden names (``.*``, macOS ``._`` forks) are skipped, an unreadable folder is an error."""

    def fail(error: OSError) -> None:
        raise BadInputFile(error.filename, f"cannot be listed ({error.strerror})")

    seen, found = set(), []
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=fail):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder, n) for n in sorted(names) if not n.startswith(".")]
    return found


def detect_layout(root: Path) -> str:
    """The layout of the data under ``root``; an error naming the folder when none fits
    or when files of two layouts are mixed."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputFile(root, "is not a folder")
    if (root / "dataset.json").is_file():
        return "msd"
    names = [p.name for p in _files(root) if NIFTI.search(p.name)]
    counts = {
        name: sum(1 for n in names if layout.pattern().match(n))
        for name, layout in LAYOUTS.items()
        if layout.suffixes
    }
    found = [name for name, count in counts.items() if count]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InconsistentCase(
            root, "no BraTS cases found (expected <id>_flair.nii.gz ..., <id>-t2f.nii.gz ... or dataset.json)"
        )
    raise InconsistentCase(root, f"files of several layouts ({', '.join(found)}): pass --layout")


def discover(root: str | Path, layout: str | None = None, partial: bool = False) -> Discovery:
    """Find every case under ``root`` (recursively), in ``layout`` or the detected one.

    ``partial``: a case folder that lacks some sequences is still a case (for inference with
    a model that allows missing sequences), not a problem."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputFile(root, "is not a folder")
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise ConfigurationError(f"unknown layout '{layout}'; choose one of {sorted(LAYOUTS)}")
    found = _discover_msd(root) if layout == "msd" else _discover_per_sequence(root, LAYOUTS[layout], partial)
    if not found.cases and not found.problems:
        raise InconsistentCase(root, f"no {layout} cases found")
    return found


def _discover_per_sequence(root: Path, layout: Layout, partial: bool = False) -> Discovery:
    pattern = layout.pattern()
    part_of = {suffix: modality for modality, suffix in layout.suffixes.items()} | {layout.label_suffix: "seg"}
    groups: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for path in _files(root):
        match = pattern.match(path.name)
        if match:
            groups[(path.parent, match["case"])][part_of[match["part"]]] = path
    seen: dict[str, Path] = {}
    cases, problems = [], []
    for (folder, case_id), parts in sorted(groups.items()):
        if case_id in seen:
            problems.append(InconsistentCase(folder, f"duplicate case {case_id} (also in {seen[case_id]})"))
            continue
        seen[case_id] = folder
        missing = [m for m in MODALITIES if m not in parts]
        if missing and not (partial and len(missing) < len(MODALITIES)):
            names = ", ".join(layout.file_name(case_id, m) for m in missing)
            problems.append(InconsistentCase(folder / case_id, f"missing sequence file(s) {names}"))
            continue
        cases.append(
            Case(case_id, layout.name, tuple(parts.get(m) for m in MODALITIES), parts.get("seg"))
        )
    return Discovery(layout.name, cases, problems)


def _discover_msd(root: Path) -> Discovery:
    manifest = root / "dataset.json"
    try:
        spec = json.loads(manifest.read_text())
        channel_names = {int(k): str(v) for k, v in spec["modality"].items()}
        entries = [(e["image"], e.get("label")) for e in spec.get("training", [])]
        entries += [(e if isinstance(e, str) else e["image"], None) for e in spec.get("test", [])]
        if not all(isinstance(i, str) and isinstance(lab, (str, type(None))) for i, lab in entries):
            raise TypeError("'image' and 'label' must be paths (strings)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInputFile(manifest, f"not a valid MSD dataset.json ({error.__class__.__name__}: {error})") from None
    channels = _msd_channels(manifest, channel_names)
    cases, problems, seen = [], [], {}
    for image, label in entries:
        image_path = Path(os.path.normpath(root.absolute() / image))  # not resolve(): keep link names
        case_id = NIFTI.sub("", image_path.name)
        if case_id in seen:
            problems.append(InconsistentCase(image_path, f"duplicate case {case_id} in dataset.json"))
            continue
        seen[case_id] = image_path
        if not image_path.is_file():
            problems.append(BadInputFile(image_path, "listed in dataset.json but missing"))
            continue
        label_path = Path(os.path.normpath(root.absolute() / label)) if label else None
        if label_path is not None and not label_path.is_file():
            problems.append(BadInputFile(label_path, "listed in dataset.json but missing"))
            continue
        cases.append(Case(case_id, "msd", (image_path,), label_path, channels))
    return Discovery("msd", cases, problems)


def _msd_channels(manifest: Path, names: dict[int, str]) -> tuple[int, ...]:
    by_modality = {}
    for index, name in names.items():
        modality = MSD_CHANNEL_NAMES.get(name.strip().lower())
        if modality is None:
            raise BadInputFile(manifest, f"unknown MRI sequence '{name}' in 'modality'")
        if modality in by_modality:
            raise BadInputFile(manifest, f"'modality' names {modality} twice (channels {by_modality[modality]} and {index})")
        by_modality[modality] = index
    if sorted(names) != list(range(len(MODALITIES))):
        raise BadInputFile(manifest, f"'modality' must number the channels 0..3, got {sorted(names)}")
    missing = [m for m in MODALITIES if m not in by_modality]
    if missing:
        raise BadInputFile(manifest, f"'modality' lacks {', '.join(missing)}")
    return tuple(by_modality[m] for m in MODALITIES)


def describe_sequences(cases: list[Case]) -> str:
    """What the cases hold, e.g. ``8 with all four sequences, 5 with flair, t1ce``."""
    held = Counter(tuple(m for m, p in zip(MODALITIES, c.images) if p is not None) if len(c.images) > 1
                   else tuple(MODALITIES) for c in cases)
    return ", ".join(f"{n} with " + ("all four sequences" if len(names) == len(MODALITIES) else ", ".join(names))
                     for names, n in sorted(held.items(), key=lambda item: (-len(item[0]), item[0])))
