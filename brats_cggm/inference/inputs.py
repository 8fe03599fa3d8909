"""What a user may hand the segmenter, turned into cases: a folder of cases in any
supported layout (a case folder lacking a sequence is still a case here), or the files
of one case (up to four 3-D sequences named so that the sequence can be told, or one 4-D
file with the channels in the order flair, t1, t1ce, t2)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from brats_cggm import MODALITIES
from brats_cggm.data.layouts import NIFTI, Case, discover
from brats_cggm.errors import BadInputFile, InconsistentCase, UserError

#: name parts that identify a sequence (BraTS 2021 and 2023 suffixes, MSD channel names,
#: common scanner-export spellings)
SEQUENCE_NAMES = {
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1pre": "t1", "t1native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce", "t1contrast": "t1ce",
    "t2": "t2", "t2w": "t2",
}
_TOKEN = re.compile(r"[^a-z0-9]+")


def sequence_from_name(name: str) -> str | None:
    """The sequence a file name points to (``BraTS2021_00000_t1ce.nii.gz`` -> ``t1ce``),
    judged from its last telling part; ``None`` when no part names one."""
    tokens = [t for t in _TOKEN.split(NIFTI.sub("", Path(name).name).lower()) if t]
    for token in reversed(tokens):
        if token in SEQUENCE_NAMES:
            return SEQUENCE_NAMES[token]
    return None


def case_from_files(paths: Sequence[Path], case_id: str | None = None,
                    sequences: Sequence[str | None] | None = None) -> Case:
    """One case from its files; ``sequences`` (one per file, ``None`` = guess from the
    name) overrides the names. A single 4-D file holds all four sequences in canonical order."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise BadInputFile(path, "file not found")
        if not NIFTI.search(path.name):
            raise BadInputFile(path, "is not a NIfTI file (.nii or .nii.gz)")
    case_id = case_id or _common_stem(paths)
    if len(paths) == 1 and (sequences is None or sequences[0] is None) and sequence_from_name(paths[0].name) is None:
        return Case(case_id, "msd", (paths[0],))
    given = sequences or [None] * len(paths)
    if len(given) != len(paths):
        raise UserError(f"{len(paths)} file(s) but {len(given)} sequence name(s)")
    by_sequence: dict[str, Path] = {}
    for path, named in zip(paths, given):
        sequence = named or sequence_from_name(path.name)
        if sequence not in MODALITIES:
            raise BadInputFile(path, f"cannot tell which sequence this is from its name; name it *_{{{','.join(MODALITIES)}}}.nii.gz or say so")
        if sequence in by_sequence:
            raise InconsistentCase(path, f"a second {sequence} image (the first is {by_sequence[sequence].name})")
        by_sequence[sequence] = path
    return Case(case_id, "brats2021", tuple(by_sequence.get(m) for m in MODALITIES))


def _common_stem(paths: Sequence[Path]) -> str:
    """``BraTS2021_00000_flair.nii.gz, BraTS2021_00000_t1.nii.gz`` -> ``BraTS2021_00000``:
    each name without its sequence part, then what they share."""
    stems = []
    for path in paths:
        stem = NIFTI.sub("", path.name)
        last = _TOKEN.split(stem.lower())[-1]
        stems.append(re.sub(r"[^A-Za-z0-9]*[A-Za-z0-9]+$", "", stem) if last in SEQUENCE_NAMES else stem)
    return os.path.commonprefix(stems).rstrip("-_. ") or "case"


def find_cases(inputs: Sequence[Path], layout: str | None = None) -> tuple[list[Case], list[UserError]]:
    """The cases named by ``--input``: one folder (every case under it) or the files of one
    case; plus the problems that kept folders from being cases."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("no --input given")
    if len(inputs) == 1 and inputs[0].is_dir():
        found = discover(inputs[0], layout, partial=True)
        return found.cases, list(found.problems)
    folders = [p for p in inputs if p.is_dir()]
    if folders:
        raise BadInputFile(folders[0], "is a folder: give one folder, or the files of one case")
    return [case_from_files(inputs)], []
