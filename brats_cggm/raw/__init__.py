"""Raw clinical examinations in: DICOM series or NIfTI files, one grid per sequence, skull on
-> a BraTS-ready case (``ingest``), and the segmentation back on the scanner's grid and as a
DICOM SEG (``predict --raw``). Needs the ``raw`` extra (SimpleITK, pydicom, highdicom, and
nilearn for the MNI152 atlas); brain extraction runs deepbet's networks with ONNX Runtime from
the weights in ``weights/``.

* series.py: find, check and read DICOM series and NIfTI files
* identify.py: which series is FLAIR, T1, T1ce, T2
* register.py: rigid registration (sequences to the T1ce, the T1ce to MNI152)
* brain.py: brain extraction
* ingest.py: the chain per case, and the BraTS-ready case it writes
* native.py: segmentation mapped back to the reference series' grid
* dicom_seg.py: the DICOM SEG
* cases.py: the cases of a folder or .zip
"""
