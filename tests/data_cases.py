"""Tiny synthetic BraTS cases written with nibabel, in each official layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_cggm.data.labels import to_scheme
from brats_cggm.data.layouts import LAYOUTS

SHAPE = (24, 28, 20)
#: BraTS files are LPS-oriented with an origin offset
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def synthetic_volumes(seed: int, shape=SHAPE):
    """Four sequences with a brain-like blob and a label in BraTS 2021 numbering."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    centre = rng.uniform(-0.2, 0.2, 3)[:, None, None, None]
    distance = np.sqrt(((grid - centre) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[distance < 0.45] = 2
    label[distance < 0.3] = 4
    label[distance < 0.18] = 1
    images = []
    for k in range(4):
        image = (100 + 20 * k + 10 * rng.standard_normal(shape)) * brain + 30.0 * (label > 0) * (k + 1)
        images.append(np.clip(image, 0, None).astype(np.float32) * brain)
    return images, label


def write_case(root: Path, case_id: str, layout: str, seed: int = 0, label: bool = True) -> Path:
    spec = LAYOUTS[layout]
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    images, seg = synthetic_volumes(seed)
    for modality, image in zip(spec.suffixes, images):
        nib.save(nib.Nifti1Image(image, AFFINE), folder / spec.file_name(case_id, modality))
    if label:
        seg = to_scheme(seg, spec.label_scheme)
        nib.save(nib.Nifti1Image(seg, AFFINE), folder / spec.file_name(case_id, "seg"))
    return folder


def write_msd(root: Path, case_ids, channel_names=("FLAIR", "T1w", "t1gd", "T2w")) -> Path:
    """MSD Task01: 4-D images with channels in ``channel_names`` order; the last case is
    listed under "test" (no label)."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    canonical = ("flair", "t1w", "t1gd", "t2w")
    training = []
    for i, case_id in enumerate(case_ids):
        images, seg = synthetic_volumes(i)
        order = [canonical.index(n.lower()) for n in channel_names]
        volume = np.stack([images[j] for j in order], axis=-1)
        nib.save(nib.Nifti1Image(volume, AFFINE), root / "imagesTr" / f"{case_id}.nii.gz")
        if i < len(case_ids) - 1:
            nib.save(nib.Nifti1Image(to_scheme(seg, "msd"), AFFINE), root / "labelsTr" / f"{case_id}.nii.gz")
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    manifest = {
        "name": "BRATS", "modality": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training), "training": training,
        "test": [f"./imagesTr/{case_ids[-1]}.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(manifest, indent=1))
    return root
