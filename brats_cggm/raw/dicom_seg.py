"""The label map as a DICOM Segmentation object (highdicom) that references the T1ce series
it was drawn on: one binary segment per BraTS region (whole tumour, tumour core, enhancing
tumour; nested, so a voxel may be in several), frame for frame with the source images, so it
opens over that series in 3D Slicer and OHIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brats_cggm import __version__
from brats_cggm.data.labels import REGIONS

#: region -> (segment label, SNOMED CT property type)
SEGMENTS = {
    "WT": ("whole tumour (oedema, core and enhancing tumour)", "Neoplasm"),
    "TC": ("tumour core (necrosis and enhancing tumour)", "Neoplasm"),
    "ET": ("enhancing tumour", "Neoplasm"),
}
SEGMENT_ORDER = ("WT", "TC", "ET")


def write_seg(regions: np.ndarray, source_files: tuple[Path, ...], path: Path, series_number: int = 900) -> Path:
    """Write ``regions`` (``[3, x, y, z]`` bool masks of TC, WT, ET on the source series' grid,
    slice ``z`` = the ``z``-th of ``source_files`` or frame of a multi-frame file) as a DICOM SEG."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in source_files]
    # (x, y, z) -> frames (z), rows (y), columns (x), segments
    stacked = np.stack([regions[REGIONS.index(r)] for r in SEGMENT_ORDER], axis=-1)
    pixels = np.ascontiguousarray(np.transpose(stacked, (2, 1, 0, 3))).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="brats-cggm", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=SEGMENTS[region][0],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=getattr(codes.SCT, SEGMENTS[region][1]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        )
        for i, region in enumerate(SEGMENT_ORDER)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="brats-cggm",
        manufacturer_model_name="brats-cggm", software_versions=__version__, device_serial_number="0",
        series_description="brats-cggm tumour regions (research use)",
    )
    seg.save_as(path)
    return path


def read_seg(path: Path, source_files: tuple[Path, ...]) -> np.ndarray:
    """A SEG back as ``[3, x, y, z]`` bool masks of TC, WT, ET on the grid of its source series
    (``source_files`` in slice order, or the one multi-frame file), through highdicom's lookup
    of each source image or frame."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    numbers = [SEGMENT_ORDER.index(r) + 1 for r in REGIONS]  # TC, WT, ET
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1)) > 1:
        frames = list(range(1, int(sources[0].NumberOfFrames) + 1))
        pixels = seg.get_pixels_by_source_frame(sources[0].SOPInstanceUID, frames, segment_numbers=numbers)
    else:
        pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], segment_numbers=numbers)
    # (z, rows = y, columns = x, segments) -> (segments, x, y, z)
    return np.transpose(pixels, (3, 2, 1, 0)) > 0
