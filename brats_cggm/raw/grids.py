"""Between SimpleITK images (LPS geometry, (z, y, x) arrays) and nibabel's view (RAS affine,
(x, y, z) arrays), and the 1 mm R-A-S grids brain extraction runs on."""

from __future__ import annotations

import numpy as np

#: LPS <-> RAS
FLIP = np.diag([-1.0, -1.0, 1.0])


def affine_of(image) -> np.ndarray:
    """A SimpleITK image's voxel -> RAS world matrix (nibabel's affine)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine[:3] = FLIP @ affine[:3]
    return affine


def image_from(array: np.ndarray, affine: np.ndarray):
    """An (x, y, z) array with a RAS affine (nibabel's view) as a float32 ``SimpleITK.Image``."""
    import SimpleITK as sitk

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(array, np.float32), (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((FLIP @ affine[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin((FLIP @ affine[:3, 3]).tolist())
    return image


def ras_grid(image, spacing: float = 1.0):
    """An empty ``SimpleITK.Image`` on a ``spacing`` mm grid whose axes run R, A, S and which
    covers ``image``'s field of view."""
    import SimpleITK as sitk

    size = np.array(image.GetSize()) - 1
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.array(k) * size])
                        for k in np.ndindex(2, 2, 2)])
    direction = np.diag([-1.0, -1.0, 1.0])  # LPS world: index axes towards R, A, S
    ras = corners @ direction  # coordinates along the grid's axes
    low, high = ras.min(axis=0), ras.max(axis=0)
    grid = sitk.Image([int(np.ceil((h - lo) / spacing)) + 1 for lo, h in zip(low, high)], sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(direction.flatten().tolist())
    grid.SetOrigin((direction @ low).tolist())
    return grid


def to_xyz(image) -> np.ndarray:
    """A SimpleITK image's voxels as an (x, y, z) array (SimpleITK gives z, y, x)."""
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def from_xyz(array: np.ndarray, like):
    """An (x, y, z) array as a SimpleITK image on ``like``'s grid."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.CopyInformation(like)
    return image
