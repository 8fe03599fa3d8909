"""Rigid registration (SimpleITK): each sequence to the T1ce, the T1ce to the MNI152 atlas.

Mattes mutual information (32 bins, a fixed-seed random sample of 60,000 points per
resolution, so results repeat),
three resolutions (shrink 4, 2, 1; smoothing 2, 1, 0 mm; the atlas registration stops at
2 mm), regular-step gradient descent on a Euler transform with scales from physical shifts: the settings of the BraTS preprocessing
tools (ANTs ``rigid``, Mattes MI) carried to ITK's registration framework. Sequences of one
examination start from the scanner's own coordinates (identity); the atlas registration
starts by matching the brains' centres of mass.

Transforms follow ITK: a transform maps a point of the FIXED space to the MOVING space, so
``sitk.Resample(moving, fixed_grid, t)`` puts the moving image on the fixed grid.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_cggm.errors import InconsistentCase

#: nilearn's copy of the ICBM 2009a nonlinear symmetric MNI152 T1 template (1 mm, brain only)
ATLAS_FILE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
ATLAS_NAME = "MNI152 ICBM 2009a nonlinear symmetric T1 (nilearn's copy, 1 mm, 197x233x189)"
#: Mattes MI after registration worse (higher) than this means the registration failed. Measured
#: (bench/raw_recovery.py, 13 real cases x 2 grid kinds; bench/raw_real.py): sequence pairs end
#: between -0.77 and -0.25, the T1ce's brain to the atlas between -0.49 and -0.29. It catches
#: gross failures (wrong anatomy, no overlap); a registration a few mm off can still pass it.
METRIC_LIMIT = {"sequence": -0.2, "atlas": -0.2}
SEED = 20241207
#: the resolutions (shrink factors) and the metric's random sample per resolution (points)
SHRINK = (4, 2, 1)
#: the atlas registration stops at 2 mm (a frame for the model, not a fine alignment)
ATLAS_SHRINK = (4, 2)
#: the pitch angles (degrees) the atlas registration starts from (the best at 4 mm goes on)
START_ANGLES = tuple(range(-30, 31, 10))
#: smoothing (mm) at each shrink factor
SMOOTHING = {4: 4.0, 2: 1.0, 1: 0.0}
SAMPLES = 15000
EVALUATION_SAMPLES = 200000


class RegistrationFailed(InconsistentCase):
    """A registration whose final metric says it did not converge."""


@dataclass(frozen=True)
class Registration:
    """A rigid transform (fixed point -> moving point) and how it was reached."""

    transform: Any  # SimpleITK.Euler3DTransform
    metric_before: float
    metric_after: float
    iterations: int
    stop: str

    def matrix(self) -> np.ndarray:
        """The 4 x 4 matrix of the transform in LPS mm (fixed point -> moving point)."""
        return transform_matrix(self.transform)

    def summary(self) -> dict[str, Any]:
        angle = float(np.degrees(np.arccos(np.clip((np.trace(self.matrix()[:3, :3]) - 1) / 2, -1, 1))))
        return {
            "transform": "Euler3D, ITK convention (fixed point -> moving point), LPS mm",
            "matrix_lps": np.round(self.matrix(), 6).tolist(),
            "rotation_deg": round(angle, 3),
            "translation_mm": round(float(np.linalg.norm(self.matrix()[:3, 3])), 3),
            "mattes_mi_before": round(self.metric_before, 4),
            "mattes_mi_after": round(self.metric_after, 4),
            "iterations": self.iterations,
            "optimizer_stop": self.stop,
        }


def transform_matrix(transform) -> np.ndarray:
    """Any SimpleITK linear transform (or a composite of them) as a 4 x 4 matrix."""
    matrix = np.eye(4)
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in points])
    matrix[:3, 3] = mapped[0]
    matrix[:3, :3] = (mapped[1:] - mapped[0]).T
    return matrix


def from_matrix(matrix) -> Any:
    """A 4 x 4 matrix (as ``ingest.json`` records them) as a ``SimpleITK.AffineTransform``."""
    import SimpleITK as sitk

    matrix = np.asarray(matrix, dtype=float)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].flatten().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def atlas_path() -> Path:
    """The MNI152 template inside the installed nilearn (read as a file: nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nilearn (which ships the MNI152 atlas) is not installed: pip install 'brats-cggm[raw]'")
    path = Path(spec.submodule_search_locations[0]) / ATLAS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the MNI152 template is missing from nilearn: {path}")
    return path


def atlas():
    """The atlas as a float32 ``SimpleITK.Image``."""
    import SimpleITK as sitk

    return sitk.Cast(sitk.ReadImage(str(atlas_path())), sitk.sitkFloat32)


def _evaluator(fixed, transform):
    """The metric the results are judged by: Mattes MI on a fixed-seed sample of the fixed
    image at full resolution (``EVALUATION_SAMPLES`` points), at ``transform``."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(min(1.0, EVALUATION_SAMPLES / float(np.prod(fixed.GetSize()))), SEED)
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return method


def _metric(method, fixed, moving) -> float:
    try:
        return float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few samples overlap
        return 0.0


def rigid(fixed, moving, initial: str = "identity", iterations: int = 200, shrink: tuple[int, ...] = SHRINK) -> Registration:
    """Register ``moving`` to ``fixed`` rigidly (both float32 ``SimpleITK.Image``).

    ``initial`` "identity": the scanner's coordinates (sequences of one examination);
    "moments": centres of mass matched (an image to the atlas)."""
    import SimpleITK as sitk

    mode = {"identity": sitk.CenteredTransformInitializerFilter.GEOMETRY,
            "moments": sitk.CenteredTransformInitializerFilter.MOMENTS}[initial]
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode)
    if initial == "identity":  # keep the scanner's alignment; only the rotation centre moves
        start = sitk.Euler3DTransform(start.GetCenter(), 0.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    else:
        start = _best_start(fixed, moving, start)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # gradients at the sample points only: a whole-image gradient filter costs seconds per level
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = float(np.prod(fixed.GetSize()))
    method.SetMetricSamplingPercentagePerLevel([min(0.5, SAMPLES / (voxels / s ** 3)) for s in shrink], SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-8, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel([SMOOTHING[s] for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(start, inPlace=False)
    before = _metric(_evaluator(fixed, start), fixed, moving)
    final = method.Execute(fixed, moving)
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(final).GetNthTransform(0)) \
        if final.GetName() == "CompositeTransform" else sitk.Euler3DTransform(final)
    return Registration(transform, before, _metric(_evaluator(fixed, transform), fixed, moving), method.GetOptimizerIteration(),
                        method.GetOptimizerStopConditionDescription())


def given(transform, fixed, moving) -> Registration:
    """A known transform (any linear one), recorded and scored like a registration's."""
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform()
    matrix = transform_matrix(transform)
    euler.SetMatrix(matrix[:3, :3].flatten().tolist())
    euler.SetTranslation(matrix[:3, 3].tolist())
    value = _metric(_evaluator(fixed, euler), fixed, moving)
    return Registration(euler, value, value, 0, "given")


def _best_start(fixed, moving, start):
    """The centred start turned by the pitch and roll angles of ``START_ANGLES`` whose metric,
    at 4 mm, is best: a head's pitch in the scanner differs from the atlas's by up to ~30
    degrees, more than the gradient descent reliably turns through."""
    import SimpleITK as sitk

    coarse = [sitk.SmoothingRecursiveGaussian(sitk.Shrink(image, [4] * 3), 2.0) for image in (fixed, moving)]
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    best = None
    for pitch in START_ANGLES:
        for roll in (0.0,):
            candidate = sitk.Euler3DTransform(start.GetCenter(), np.radians(pitch), 0.0, np.radians(roll), start.GetTranslation())
            method.SetInitialTransform(candidate)
            value = _metric(method, *coarse)
            if best is None or value < best[0]:
                best = (value, candidate)
    return best[1]


def check_converged(case_id: str, what: str, kind: str, registration: Registration) -> None:
    """Raise :class:`RegistrationFailed` when the final metric is outside the range measured
    on real examinations."""
    limit = METRIC_LIMIT[kind]
    if registration.metric_after > limit:
        raise RegistrationFailed(case_id, f"{what}: the registration did not converge (Mattes MI "
                                          f"{registration.metric_after:.3f}; successful ones end below {limit})")


def mean_displacement(a, b, mask) -> float:
    """Mean distance (mm) between where transforms ``a`` and ``b`` (linear) send the voxels of
    ``mask`` (a binary ``SimpleITK.Image``)."""
    import SimpleITK as sitk

    index = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1].astype(float)
    origin, spacing = np.array(mask.GetOrigin()), np.array(mask.GetSpacing())
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    points = origin + (index * spacing) @ direction.T
    difference = transform_matrix(a) - transform_matrix(b)
    return float(np.linalg.norm(points @ difference[:3, :3].T + difference[:3, 3], axis=1).mean())
