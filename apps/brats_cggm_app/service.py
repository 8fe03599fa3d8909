"""What the app does with an upload, without any Gradio: turn the uploaded files into a
case (four sequence files, one 4-D file, or a zip of a case folder), run the segmenter,
write the results. Every file it touches lies in its :class:`Workspace`.

Raw examinations take the raw path (``brats_cggm.raw``): a zip of DICOM series, or sequence
files on different grids, are ingested (identified, co-registered, skull-stripped), segmented
and mapped back; the result is shown on the T1ce as acquired.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brats_cggm import MODALITIES
from brats_cggm.data.layouts import NIFTI, Case, discover
from brats_cggm.data.validation import load_sequences
from brats_cggm.errors import BadInputFile, InconsistentCase, UserError
from brats_cggm.inference.contributions import coalition_plan
from brats_cggm.inference.inputs import case_from_files, sequence_from_name
from brats_cggm.inference.outputs import write_prediction
from brats_cggm.inference.prediction import Prediction
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm_app.views import CaseViews

DISPLAY_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}
#: the largest grid accepted (voxels per sequence): more than any MRI of a head
MAX_VOXELS = 400**3
#: a zip may hold at most this many files and unpack to at most this many bytes
ZIP_MAX_MEMBERS = 64
#: a zip of DICOM series (one file per slice) may hold this many files
DICOM_ZIP_MAX_MEMBERS = 5000
ZIP_MAX_BYTES = 4 << 30
EXAMPLE_SIZE = 96


class Workspace:
    """The app's temporary folder: uploads (Gradio's cache), per-request staging folders
    (removed when the request ends), per-session result folders (removed with the
    session) and the example case."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for name in ("gradio", "requests", "sessions", "api"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._example_lock = threading.Lock()

    @property
    def uploads(self) -> Path:
        return self.root / "gradio"

    @contextmanager
    def request(self) -> Iterator[Path]:
        """A folder for one request's inputs, removed afterwards."""
        folder = Path(tempfile.mkdtemp(dir=self.root / "requests"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def session_folder(self) -> Path:
        folder = self.root / "sessions" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def api_folder(self, keep_seconds: float = 900) -> Path:
        """A folder for one API call's results (Gradio copies them into its cache when the
        call returns); folders of calls older than ``keep_seconds`` are removed now."""
        now = time.time()
        for old in (self.root / "api").iterdir():
            if now - old.stat().st_mtime > keep_seconds:
                shutil.rmtree(old, ignore_errors=True)
        folder = self.root / "api" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def example_files(self) -> list[Path]:
        """The four sequence files of a phantom case, written on first use."""
        from brats_cggm.data.phantom import write_phantoms

        folder = self.root / "example"
        with self._example_lock:
            files = sorted(p for p in folder.glob("*/*.nii.gz") if not p.name.endswith("_seg.nii.gz"))
            if len(files) != len(MODALITIES):
                shutil.rmtree(folder, ignore_errors=True)
                write_phantoms(folder, 1, size=EXAMPLE_SIZE, layout="brats2021", seed=0)
                files = sorted(p for p in folder.glob("*/*.nii.gz") if not p.name.endswith("_seg.nii.gz"))
        by_sequence = {sequence_from_name(p.name): p for p in files}
        return [by_sequence[m] for m in MODALITIES]


def guess_assignment(names: Sequence[str]) -> dict[str, int | None]:
    """Sequence -> the index of the uploaded file that holds it, guessed from the names
    (the latest upload wins; None when no name tells it)."""
    assignment: dict[str, int | None] = dict.fromkeys(MODALITIES)
    for index, name in enumerate(names):
        sequence = sequence_from_name(name)
        if sequence is not None:
            assignment[sequence] = index
    return assignment


def describe_upload(names: Sequence[str]) -> str:
    """One line on how the uploaded files will be read (as :meth:`Runner.case` reads them)."""
    if not names:
        return ("Upload the four sequences (FLAIR, T1, T1ce, T2), one 4-D NIfTI, a zip of a case folder, or a zip of "
                "an examination's DICOM series.")
    assignment = guess_assignment(names)
    earlier = " Earlier uploads are not used." if len(names) > 1 else ""
    if all(index is None for index in assignment.values()):
        if names[-1].lower().endswith(".zip"):
            return (f"{names[-1]}: a zip of one case folder (its file names tell the sequences) or of one "
                    f"examination's DICOM series (identified, co-registered and skull-stripped first).{earlier}")
        return f"{names[-1]}: one 4-D image, channels read as FLAIR, T1, T1ce, T2 (or pick its sequence below).{earlier}"
    unused = [name for index, name in enumerate(names) if index not in assignment.values()]
    text = "Sequences guessed from the file names; correct them below if needed."
    if unused:
        text += f" Not used: {', '.join(unused)}."
    return text


@dataclass
class Outcome:
    """One segmented case: the prediction, its files, and the images it was made from."""

    prediction: Prediction
    summary: dict[str, Any]
    label_map: Path
    summary_file: Path
    contributions_zip: Path | None
    images: dict[str, np.ndarray]
    #: more downloads (the raw path's DICOM SEG)
    extra_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class RawCase:
    """An upload for the raw path: a folder of DICOM series or of sequence files on their own
    grids, and which file is which sequence where the user said so."""

    case_id: str
    folder: Path
    overrides: dict[str, str]


class Runner:
    """Turns uploads into cases and cases into results, with one shared segmenter."""

    def __init__(self, segmenter: Segmenter, workspace: Workspace) -> None:
        self.segmenter, self.workspace = segmenter, workspace

    @property
    def model_info(self) -> dict[str, Any]:
        """The segmenter's model info with the file name only: the page does not tell users
        where the server keeps its files."""
        return {**self.segmenter.model_info, "source": Path(self.segmenter.source).name}

    def case(self, uploads: Sequence[str | Path], assignment: dict[str, int | None], staging: Path) -> Case:
        """The case the uploaded files make: the files ``assignment`` names (sequence ->
        index into ``uploads``) or, when it names none, the latest upload as a zip of a
        case folder or (if its name tells no sequence) as a 4-D image. The files used are
        linked into ``staging`` under their own names, so that messages name the user's files."""
        if not uploads:
            raise UserError("no file uploaded")
        chosen = {m: i for m, i in assignment.items() if i is not None}
        if any(not 0 <= i < len(uploads) for i in chosen.values()):
            raise UserError("a sequence is assigned to a file that is no longer uploaded: pick the files again")
        if not chosen:
            latest = _stage(uploads[-1], staging / "files" / "0")
            if latest.name.lower().endswith(".zip"):
                if not _holds_nifti(latest):
                    return _raw_from_zip(latest, staging / "unzipped")
                return _case_from_zip(latest, staging / "unzipped")
            if sequence_from_name(latest.name) is None:
                return case_from_files([latest])  # one 4-D image
            raise UserError("no file is assigned to a sequence: pick the files above")
        indices = list(chosen.values())
        twice = next((i for i in indices if indices.count(i) > 1), None)
        if twice is not None:
            raise UserError(f"{Path(uploads[twice]).name} is assigned to two sequences")
        files = [_stage(uploads[i], staging / "files" / str(i)) for i in indices]
        case = case_from_files(files, sequences=list(chosen))
        if not _one_grid(files):  # sequences on their own grids: the raw path aligns them
            return RawCase(case.case_id, staging / "files", {m: f.name for m, f in zip(chosen, files)})
        return case

    def run(self, case: Case | RawCase, out: Path, contributions: str | None = "occlusion",
            progress: Callable[[float, str], None] = lambda fraction, text: None) -> Outcome:
        """Segment ``case``; its label map, JSON and contribution maps (one zip of compact
        maps: int8 with ``scl_slope``, cropped; see brats_cggm.inference.compact) go into
        ``out``. The images are read once, for the segmenter (``predict_arrays``, as
        ``predict_case`` does) and for the views. A :class:`RawCase` takes the raw path."""
        if isinstance(case, RawCase):
            return self.run_raw(case, out, progress)
        progress(0.05, "Reading the images")
        _check_grid(case)
        volumes = load_sequences(case)
        reference = next(iter(volumes.values()))
        images = {m: v.data for m, v in volumes.items()}
        passes = len(coalition_plan([m in images for m in MODALITIES], contributions).masks)
        progress(0.15, f"Segmenting with {', '.join(DISPLAY_NAMES[m] for m in images)} ({passes} network pass(es) per window)")
        prediction = self.segmenter.predict_arrays(
            images, reference.affine, case.case_id, reference.header, contributions=contributions,
            inputs={m: (volumes[m].path.name if m in volumes else None) for m in MODALITIES},
            progress=lambda done, total: progress(0.15 + 0.7 * done / total, f"Segmenting: window {done} of {total}"))
        progress(0.85, "Writing the label map and the contribution maps")
        out.mkdir(parents=True, exist_ok=True)
        summary = write_prediction(prediction, out, model=self.model_info, compact_contributions=True)
        files = summary["files"]
        zipped = None
        if prediction.contributions:
            zipped = out / f"{case.case_id}_contributions.zip"
            with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as archive:
                for name in files["contributions"].values():
                    archive.write(out / name, name)
        return Outcome(prediction, summary, out / files["labels"], out / f"{case.case_id}.json", zipped, images)

    def run_raw(self, case: RawCase, out: Path, progress: Callable[[float, str], None] = lambda fraction, text: None) -> Outcome:
        """The raw path: ingest, segment in atlas space, map back to the T1ce series' grid
        (brats_cggm.raw); the views show the T1ce as acquired, without contribution maps."""
        from brats_cggm.raw.grids import to_xyz
        from brats_cggm.raw.ingest import Ingest
        from brats_cggm.raw.native import native_prediction, write_raw_prediction

        progress(0.05, "Reading the series, co-registering them, extracting the brain")
        ingested = Ingest(case.case_id, case.folder, case.overrides).run()
        progress(0.6, f"Segmenting with {', '.join(DISPLAY_NAMES[m] for m in ingested.arrays)}")
        prediction = self.segmenter.predict_arrays(ingested.arrays, ingested.atlas_affine, ingested.case_id)
        progress(0.85, f"Mapping the labels back to the {ingested.reference.upper()} as acquired")
        native = native_prediction(prediction, ingested, self.segmenter.threshold)
        report = write_raw_prediction(prediction, native, ingested, out, self.model_info, overwrite=True)
        folder = out / ingested.case_id
        files = report["files"]
        extra = tuple(folder / files[k] for k in ("dicom_seg",) if k in files)
        return Outcome(native, report, folder / files["labels_native"], folder / f"{ingested.case_id}.json", None,
                       {ingested.reference: to_xyz(ingested.reference_image)}, extra)

    def views(self, outcome: Outcome, folder: Path) -> CaseViews:
        prediction = outcome.prediction
        stored = outcome.summary["files"].get("contributions_box")  # where the maps are non-zero
        box = tuple(slice(a, a + n) for a, n in zip(stored["start"], stored["shape"])) if stored else None
        return CaseViews.create(folder, outcome.images, prediction.labels, prediction.affine,
                                prediction.contributions, box)


def _stage(upload: str | Path, folder: Path) -> Path:
    """Link (or copy) an upload into ``folder`` under its own name."""
    source = Path(upload)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def _holds_nifti(archive: Path) -> bool:
    """Whether a zip holds NIfTI files (a BraTS case) rather than DICOM series."""
    try:
        with zipfile.ZipFile(archive) as handle:
            return any(NIFTI.search(name) or name.endswith("dataset.json") for name in handle.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return True  # _case_from_zip says what is wrong with it


def _raw_from_zip(archive: Path, folder: Path) -> RawCase:
    """A zip of one examination's DICOM series, unpacked for the raw path."""
    from brats_cggm.raw.series import unpack

    with zipfile.ZipFile(archive) as handle:
        members = [m for m in handle.infolist() if not m.is_dir()]
        if len(members) > DICOM_ZIP_MAX_MEMBERS:
            raise BadInputFile(archive.name, f"holds {len(members)} files; upload one examination")
        if sum(m.file_size for m in members) > ZIP_MAX_BYTES:
            raise BadInputFile(archive.name, f"unpacks to more than {ZIP_MAX_BYTES >> 30} GB")
    folder.mkdir(parents=True, exist_ok=True)
    unpack(archive, folder)
    return RawCase(re.sub(r"\.zip$", "", archive.name, flags=re.IGNORECASE), folder, {})


def _one_grid(files: Sequence[Path]) -> bool:
    """Whether the files share one voxel grid (shape and affine), from their headers."""
    grids = []
    for path in files:
        try:
            image = nib.load(path)
        except Exception:  # noqa: BLE001 (the library's reader says what is wrong with it)
            return True
        grids.append((image.shape[:3], np.round(image.affine, 3).tobytes()))
    return len(set(grids)) <= 1


def _case_from_zip(archive: Path, folder: Path) -> Case:
    """The one case in a zip of a case folder (any layout the library knows)."""
    try:
        with zipfile.ZipFile(archive) as handle:
            members = [m for m in handle.infolist() if not m.is_dir()]
            wanted = [m for m in members if NIFTI.search(m.filename) or m.filename.endswith("dataset.json")]
            wanted = [m for m in wanted if not any(part.startswith((".", "__MACOSX")) for part in Path(m.filename).parts)]
            if len(wanted) > ZIP_MAX_MEMBERS:
                raise BadInputFile(archive.name, f"holds {len(wanted)} NIfTI files; upload one case")
            if sum(m.file_size for m in wanted) > ZIP_MAX_BYTES:
                raise BadInputFile(archive.name, f"unpacks to more than {ZIP_MAX_BYTES >> 30} GB")
            for member in wanted:
                parts = Path(member.filename).parts
                if member.filename.startswith("/") or ".." in parts:
                    raise BadInputFile(archive.name, f"holds an unsafe path {member.filename}")
                handle.extract(member, folder)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise BadInputFile(archive.name, f"is not a readable zip file ({error.__class__.__name__})") from None
    if not any(folder.rglob("*")):
        raise BadInputFile(archive.name, "holds no NIfTI file")
    found = discover(folder, partial=True)
    if len(found.cases) > 1:
        raise InconsistentCase(archive.name, f"holds {len(found.cases)} cases; upload one case at a time")
    if not found.cases:
        raise found.problems[0]
    return found.cases[0]


def _check_grid(case: Case) -> None:
    """Refuse, from the headers alone, images larger than any head MRI (before reading them)."""
    for path in case.files:
        try:
            shape = nib.load(path).shape
        except Exception:  # noqa: BLE001, S112 (the library's reader says what is wrong with it)
            continue
        if int(np.prod(shape[:3], dtype=np.int64)) > MAX_VOXELS:
            raise BadInputFile(path.name, f"grid {tuple(shape)} is larger than this app accepts "
                                          f"({MAX_VOXELS:,} voxels); use `brats-cggm predict`")


def user_message(error: UserError, staging: Path) -> str:
    """The library's one-line message, with the app's folders left out of file names."""
    text = re.sub(re.escape(str(staging / "files")) + r"/\d+/", "", str(error))
    return text.replace(f"{staging / 'unzipped'}{os.sep}", "").replace(f"{staging}{os.sep}", "")
