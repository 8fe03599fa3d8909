"""Which series is FLAIR, T1, T1ce or T2: by name (scanner descriptions, BraTS and BIDS file
names), by the contrast tag and sequence parameters, by the user's options; unidentified and
duplicate series stop the case with the option that settles it."""

from __future__ import annotations

from pathlib import Path

import pytest

from brats_cggm.errors import InconsistentCase
from brats_cggm.raw.identify import from_names, from_parameters, identify
from brats_cggm.raw.series import Series


def dicom(description: str, number: int = 1, **header) -> Series:
    return Series(f"s{number}", "dicom", (Path(f"s{number}/1.dcm"),), number, description, header)


def nifti(name: str) -> Series:
    return Series(name, "nifti", (Path(name),), description=name)


@pytest.mark.parametrize("name, sequence", [
    ("AX T2 FLAIR", "flair"), ("t2_tirm_tra_dark-fluid", "flair"), ("Ax T1 post gad", "t1ce"),
    ("T1 MPRAGE +C", "t1ce"), ("T1 SE AX C+", "t1ce"), ("AX T1 pre", "t1"), ("t1_mprage_sag_p2_iso", "t1"),
    ("3D Ax T1 MP-RAGE_R22", "t1"), ("t2_tse_tra", "t2"), ("t2_swi_tra", None), ("AX T2*", None),
    ("ep2d_diff_3scan", None), ("localizer", None),
])
def test_scanner_descriptions(name, sequence):
    assert from_names(dicom(name))[0] == sequence


@pytest.mark.parametrize("name, sequence", [
    ("BraTS2021_00006_flair.nii.gz", "flair"), ("BraTS2021_00006_t1ce.nii.gz", "t1ce"),
    ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"), ("BraTS-GLI-00000-000-t1n.nii.gz", "t1"),
    ("BraTS-GLI-00000-000-t1c.nii.gz", "t1ce"), ("BraTS-GLI-00000-000-t2w.nii.gz", "t2"),
    ("sub-01_ce-gadolinium_T1w.nii.gz", "t1ce"), ("sub-01_T2w.nii", "t2"), ("case_T1Gd.nii.gz", "t1ce"),
])
def test_file_names(name, sequence):
    assert from_names(nifti(name))[0] == sequence


def test_sequence_parameters_name_what_the_names_do_not():
    tr_te = {"repetition_time_ms": 9000.0, "echo_time_ms": 110.0, "inversion_time_ms": 2500.0, "scanning_sequence": "SE\\IR"}
    assert from_parameters(dicom("tir2d1_21", **tr_te))[0] == "flair"
    assert from_parameters(dicom("tse2d1_11", repetition_time_ms=4000.0, echo_time_ms=91.0))[0] == "t2"
    assert from_parameters(dicom("se2d1", repetition_time_ms=500.0, echo_time_ms=12.0))[0] == "t1"
    post = from_parameters(dicom("se2d1r", repetition_time_ms=500.0, echo_time_ms=17.0, contrast_agent="GADOVIST"))
    assert post[0] == "t1ce" and "contrast agent" in post[1]
    chosen, table = identify("c", [dicom("se2d1", 1, repetition_time_ms=500.0, echo_time_ms=12.0)])
    assert list(chosen) == ["t1"] and "TR 500 ms, TE 12 ms" in table[0].reason


def test_overrides_skips_and_refusals():
    series = [dicom("AX T2 FLAIR", 2), dicom("AX T1", 3), dicom("AX T1", 4), dicom("DWI", 5)]
    with pytest.raises(InconsistentCase, match=r"series 5 'DWI' \(s5\) is not identified .*--skip 5"):
        identify("c", series)
    with pytest.raises(InconsistentCase, match=r"two series look like T1: series 3 'AX T1' \(s3\) and series 4 'AX T1' \(s4\); choose one with --t1"):
        identify("c", series, skip=["5"])
    chosen, table = identify("c", series, {"t1ce": "4"}, skip=["5"])
    assert {m: s.number for m, s in chosen.items()} == {"flair": 2, "t1": 3, "t1ce": 4}
    assert [d.reason for d in table][2:] == ["--t1ce", "left out (--skip)"]
    with pytest.raises(InconsistentCase, match=r"--t2 '9' matches no series"):
        identify("c", series, {"t2": "9"}, skip=["5"])


def test_a_folder_given_to_skip_leaves_out_all_it_holds():
    series = [nifti("scan_flair.nii.gz"), Series("reference/mask_t1.nii.gz", "nifti", (Path("reference/mask_t1.nii.gz"),))]
    chosen, _ = identify("c", series, skip=["reference"])
    assert list(chosen) == ["flair"]
