"""The web app (brats_cggm_app, in apps/), served on a free localhost port: its `segment` endpoint through
gradio_client, and the page in a real browser (headless Chromium through Playwright).

Screenshots go to pytest's tmp dir and are copied to runs/app_screenshots/
(BRATS_APP_SCREENSHOTS overrides the folder).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the app needs gradio (pip install 'brats-cggm[app]')")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from brats_cggm import MODALITIES
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.inference.inputs import case_from_files
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm_app import launch

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(os.environ.get("BRATS_APP_SCREENSHOTS", REPO / "runs" / "app_screenshots"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_FILE_MB = 4  # small, so that the size limit can be tried with an 8 MB file (a real case's files are < 3 MB)
REAL = REPO.parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"no real BraTS cases at {REAL} (a fresh clone has none)")
#: the real cases the `segment` endpoint must return on their own grid, and a check of the tumour found
REAL_CASES = {
    "brats2023/BraTS-GLI-00001-000": "2023 names",
    "brats2023/BraTS-MET-00110-000": "flipped direction (RAS where the others are LPS)",
    "brats2012/BRATS_HG0015": "160x216x176, non-zero origin",
    "brats2018/Brats18_TCIA10_637_1": "int16 scaled to the full range",
}
#: the real case the browser segments (240x240x155); the contribution zip must stay below this
BROWSER_CASE, CONTRIBUTIONS_MAX_MB = "brats2018/Brats18_2013_20_1", 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> list[Path]:
    """The four sequence files of one 64^3 phantom case, in canonical order."""
    folder = write_phantoms(tmp_path_factory.mktemp("phantom"), 1, size=64, layout="brats2021", seed=3)[0]
    return [folder / f"{folder.name}_{m}.nii.gz" for m in MODALITIES]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("app")
    demo = launch(port=free_port(), block=False, workdir=workdir, max_file_mb=MAX_FILE_MB)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def expected(phantom) -> np.ndarray:
    """The label map the segmenter (as `brats-cggm predict` runs it) gives the phantom."""
    return Segmenter.load().predict_case(case_from_files(phantom)).labels


def test_segment_endpoint_matches_the_segmenter(app, phantom, expected, tmp_path):
    client = Client(app.local_url, download_files=str(tmp_path), verbose=False)
    label_file, summary, contributions = client.predict(
        *[handle_file(str(p)) for p in phantom], True, api_name="/segment")
    out = nib.load(label_file)
    reference = nib.load(phantom[0])
    assert out.shape == reference.shape and np.allclose(out.affine, reference.affine)
    assert np.array_equal(np.asanyarray(out.dataobj), expected)
    assert summary["sequences_used"] == list(MODALITIES) and summary["sequences_missing"] == []
    assert set(summary["contributions"]["shares"]) == {"TC", "WT", "ET"}
    with zipfile.ZipFile(contributions) as archive:
        assert sorted(archive.namelist()) == sorted(f"{summary['case_id']}_contribution_{m}.nii.gz" for m in MODALITIES)


def test_segment_endpoint_reports_bad_and_partial_input(app, phantom, tmp_path):
    client = Client(app.local_url, download_files=str(tmp_path), verbose=False)
    fake = tmp_path / "notes_flair.nii.gz"
    fake.write_text("not an image")
    with pytest.raises(AppError, match="notes_flair.nii.gz: is named .gz but is not gzip-compressed"):
        client.predict(handle_file(str(fake)), *[handle_file(str(p)) for p in phantom[1:]], False, api_name="/segment")
    without_t1ce = [handle_file(str(p)) if m != "t1ce" else None for m, p in zip(MODALITIES, phantom)]
    if Segmenter.load().allows_missing:
        _, summary, _ = client.predict(*without_t1ce, False, api_name="/segment")
        assert summary["sequences_missing"] == ["t1ce"]
    else:
        with pytest.raises(AppError, match="t1ce missing"):
            client.predict(*without_t1ce, False, api_name="/segment")


def real_case(name: str) -> list[Path]:
    """The four sequence files of a real case, in canonical order."""
    from brats_cggm.inference.inputs import sequence_from_name

    by_sequence = {sequence_from_name(p.name): p for p in (REAL / name).glob("*.nii.gz")}
    return [by_sequence[m] for m in MODALITIES]


@needs_real
@pytest.mark.parametrize("name", list(REAL_CASES), ids=[n.split("/")[1] for n in REAL_CASES])
def test_segment_endpoint_returns_real_cases_on_their_own_grid(app, tmp_path, name):
    """Real files (``REAL_CASES`` says what is special about each): the label map comes back
    on exactly the input's grid (shape, affine, sform/qform codes), with a tumour inside the brain."""
    files = real_case(name)
    client = Client(app.local_url, download_files=str(tmp_path), verbose=False)
    label_file, summary, contributions = client.predict(*[handle_file(str(p)) for p in files], False,
                                                        api_name="/segment")
    out, reference = nib.load(label_file), nib.load(files[0])
    assert out.shape == reference.shape and np.array_equal(out.affine, reference.affine), (out.affine, reference.affine)
    for form in ("sform", "qform"):
        assert int(out.header[f"{form}_code"]) == (int(reference.header[f"{form}_code"]) or 1)
    assert contributions is None and summary["sequences_used"] == list(MODALITIES)
    labels = np.asanyarray(out.dataobj)
    brain = np.asanyarray(reference.dataobj) != 0
    assert summary["volumes_ml"]["WT"] > 5.0, summary["volumes_ml"]
    assert (labels > 0)[brain].sum() >= 0.95 * (labels > 0).sum()  # a mirrored map would leave the brain


# ----------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def page(app):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1600, "height": 1250}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(90_000)
        page.goto(app.local_url)
        yield page
        browser.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, SCREENSHOTS / path.name)


def upload_and_run(page, files: list[Path]) -> float:
    """Upload ``files``, press Segment, wait for the status to change; seconds from the click."""
    page.locator("#upload input[type=file]").set_input_files([str(f) for f in files])
    flair_name = next((f.name for f in files if f.name.endswith("_flair.nii.gz")), None)
    if flair_name:  # the guesses arrived in the sequence pickers
        page.wait_for_function("([name]) => document.querySelector('#pick-flair input').value === name",
                               arg=[flair_name])
    before = page.locator("#status [role=status]").get_attribute("data-update")
    start = time.perf_counter()
    page.click("#run")
    page.wait_for_function(
        """([before]) => {
            const line = document.querySelector('#status [role=status]');
            return line && line.dataset.update !== before && !line.classList.contains('status-info');
        }""", arg=[before])
    return time.perf_counter() - start


def test_browser_segment_view_and_download(page, phantom, expected, tmp_path):
    seconds = upload_and_run(page, phantom)
    status = page.locator("#status")
    assert "status-ok" in status.inner_html(), status.inner_text()
    assert "FLAIR, T1, T1ce, T2" in status.inner_text()
    axial = page.locator("#segmentation-axial img")
    axial.wait_for()
    page.locator("#shares svg g.mark-rect path").first.wait_for()  # the contribution chart's bars
    print(f"segment click -> result: {seconds:.1f} s")
    shoot(page, tmp_path, "1_segmentation")

    slider = page.locator("#slider-axial input[type=range]")
    before = axial.get_attribute("src")
    slider.fill(str(int(slider.get_attribute("max")) // 4))
    page.wait_for_function("([src]) => document.querySelector('#segmentation-axial img').src !== src", arg=[before])
    shoot(page, tmp_path, "2_slider_moved")

    page.get_by_role("tab", name="Contribution maps").click()
    page.locator("#contribution-axial img").wait_for()
    shoot(page, tmp_path, "3_contributions")

    case_id = phantom[0].name.removesuffix("_flair.nii.gz")
    with page.expect_download() as download:
        page.locator(f"#downloads a[download='{case_id}.nii.gz']").click()
    saved = tmp_path / "download.nii.gz"
    download.value.save_as(saved)
    out, reference = nib.load(saved), nib.load(phantom[0])
    assert out.shape == reference.shape and np.allclose(out.affine, reference.affine)
    assert np.array_equal(np.asanyarray(out.dataobj), expected)


def test_browser_bad_input_then_a_good_run(page, phantom, tmp_path):
    fake = tmp_path / "scan_flair.nii.gz"
    fake.write_text("this is not a NIfTI file")
    upload_and_run(page, [fake, *phantom[1:]])
    status = page.locator("#status")
    assert "status-error" in status.inner_html()
    assert "scan_flair.nii.gz: is named .gz but is not gzip-compressed" in status.inner_text()
    shoot(page, tmp_path, "4_bad_input")

    big = tmp_path / "big_flair.nii.gz"
    big.write_bytes(os.urandom(2 * MAX_FILE_MB << 20))
    page.locator("#upload input[type=file]").set_input_files(str(big))
    page.get_by_text("exceed the maximum allowed size", exact=False).first.wait_for()
    page.wait_for_timeout(500)  # the pop-up fades in
    shoot(page, tmp_path, "5_too_large")

    upload_and_run(page, phantom)
    assert "status-ok" in status.inner_html(), status.inner_text()


def download(page, tmp_path: Path, name: str) -> Path:
    with page.expect_download() as started:
        page.locator(f"#downloads a[download='{name}']").click()
    saved = tmp_path / name
    started.value.save_as(saved)
    return saved


@needs_real
def test_browser_real_case_numbers_names_and_a_small_download(page, tmp_path):
    """A real 240x240x155 case on a laptop-sized window: the upload keeps the file names
    whole, the volumes' numbers are on screen and equal the JSON's, and the contribution
    maps' zip is small, int8 with their scale in the header, on a box of the input's grid."""
    files = real_case(BROWSER_CASE)
    case_id = files[0].parent.name
    page.set_viewport_size({"width": 1280, "height": 800})
    try:
        seconds = upload_and_run(page, files)
        status = page.locator("#status")
        assert "status-ok" in status.inner_html(), status.inner_text()
        page.locator("#downloads a").first.wait_for()
        print(f"real case {case_id}: click -> result {seconds:.1f} s")
        shoot(page, tmp_path, "6_real_case")

        names = page.evaluate("""() => [...document.querySelectorAll('#upload td.filename')].map(cell => ({
            name: cell.querySelector('.stem').textContent + cell.querySelector('.ext').textContent,
            cut: [cell, ...cell.querySelectorAll('span')].some(e => e.scrollWidth > e.clientWidth + 1)}))""")
        assert [n["name"] for n in names][-len(files):] == [f.name for f in files]  # after earlier tests' uploads
        assert not any(n["cut"] for n in names), names

        summary = json.loads(download(page, tmp_path, f"{case_id}.json").read_text())
        cells = page.locator("#volumes td.ml")
        assert cells.count() == 6
        shown = []
        for index in range(cells.count()):
            cell = cells.nth(index)
            cell.scroll_into_view_if_needed()
            assert page.evaluate("""(cell) => { const r = cell.getBoundingClientRect();
                const box = document.querySelector('#volumes').getBoundingClientRect();
                const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
                return r.width > 0 && r.left >= box.left && r.right <= Math.min(box.right, window.innerWidth) + 0.5
                       && cell.contains(top); }""", cell.element_handle()), cell.inner_text()
            shown.append(float(cell.inner_text()))
        volumes = summary["volumes_ml"]
        expected = [volumes[r] for r in ("WT", "TC", "ET")]
        expected += [next(v for k, v in volumes.items() if k.startswith(f"label {value} ")) for value in (1, 2, 4)]
        assert shown == pytest.approx(expected, abs=0.0051)  # shown to 2 decimals (JavaScript rounds half up)

        zipped = download(page, tmp_path, f"{case_id}_contributions.zip")
        megabytes = zipped.stat().st_size / 1e6
        print(f"contribution maps: {megabytes:.2f} MB")
        assert megabytes < CONTRIBUTIONS_MAX_MB
        reference = nib.load(files[0])
        box = summary["files"]["contributions_box"]
        with zipfile.ZipFile(zipped) as archive:
            assert sorted(archive.namelist()) == sorted(f"{case_id}_contribution_{m}.nii.gz" for m in MODALITIES)
            archive.extractall(tmp_path / "maps")
        for path in (tmp_path / "maps").iterdir():
            image = nib.load(path)
            assert image.get_data_dtype() == np.int8 and image.shape == (*box["shape"], 3)
            assert np.allclose(image.affine, reference.affine @ _shift(box["start"]))
            assert 0 < image.dataobj.slope <= 1 / 127 + 1e-9 and np.abs(image.get_fdata()).max() <= 1.0 + 1e-6
    finally:
        page.set_viewport_size({"width": 1600, "height": 1250})


def _shift(start) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = start
    return shift


# ------------------------------------------------------------------ no server needed

@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_views_are_radiological_with_true_aspect(tmp_path, codes):
    """A marker in the patient's right-anterior-superior corner shows top-left in every
    view (right on the image's left; the face to the left in sagittal views), whatever the
    voxel order; pixels keep the voxel size."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    from brats_cggm_app.views import CaseViews, ViewSettings

    shape_ras, zooms_ras = np.array([20, 24, 16]), np.array([1.0, 1.0, 2.5])
    labels = np.zeros(shape_ras, np.uint8)
    labels[-4:, -4:, -4:] = 4  # right, anterior, superior
    to_codes = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    data = nib.orientations.apply_orientation(labels, to_codes)
    # the affine of the reoriented grid: RAS voxel -> mm, composed with new voxel -> RAS voxel
    affine = np.diag([*zooms_ras, 1.0]) @ inv_ornt_aff(to_codes, tuple(shape_ras))
    image = data.astype(np.float32) + 1
    views = CaseViews.create(tmp_path / codes, {"t1": image}, data, affine, {})
    assert views.shape == tuple(shape_ras) and np.allclose(views.zooms, zooms_ras)
    axial, coronal, sagittal = views.render(views.start, ViewSettings("t1", opacity=1.0, crosshair=False))[:3]
    for view in (axial, coronal, sagittal):  # top-left: superior or anterior, right or anterior
        rows, columns = np.nonzero((view[..., 0] > 200) & (view[..., 1] > 150) & (view[..., 2] < 60))  # ET yellow
        assert rows.mean() < view.shape[0] / 2 and columns.mean() < view.shape[1] / 2
    assert axial.shape[1] / axial.shape[0] == pytest.approx(20 / 24, rel=0.02)  # x / y in mm
    assert coronal.shape[1] / coronal.shape[0] == pytest.approx(20 / (16 * 2.5), rel=0.02)  # x / z in mm


def test_uploads_become_cases(tmp_path, phantom):
    """Four files with pickers, one 4-D file, a zip of a case folder; clear messages otherwise."""
    from types import SimpleNamespace

    from brats_cggm.errors import UserError
    from brats_cggm_app.service import (
        Runner,
        Workspace,
        describe_upload,
        guess_assignment,
        user_message,
    )

    runner = Runner(SimpleNamespace(source="model.onnx", card={}), Workspace(tmp_path / "work"))
    staging = tmp_path / "staging"
    assignment = guess_assignment([p.name for p in phantom])
    assert assignment == dict(zip(MODALITIES, range(4)))
    case = runner.case(phantom, assignment, staging)
    assert [p.name for p in case.images] == [p.name for p in phantom]

    swapped = {**assignment, "t1": 2, "t1ce": 1}  # the pickers correct a wrong name
    assert [p.name for p in runner.case(phantom, swapped, tmp_path / "s2").images][1:3] == [phantom[2].name, phantom[1].name]
    with pytest.raises(UserError, match="assigned to two sequences"):
        runner.case(phantom, {**assignment, "t1": 0}, tmp_path / "s3")

    four_d = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.asanyarray(nib.load(p).dataobj) for p in phantom], -1), nib.load(phantom[0]).affine), four_d)
    assert "one 4-D image" in describe_upload([four_d.name])
    assert runner.case([four_d], guess_assignment([four_d.name]), tmp_path / "s4").layout == "msd"

    archive = tmp_path / "case.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in phantom:
            handle.write(path, f"{phantom[0].parent.name}/{path.name}")
        handle.writestr("__MACOSX/._junk", "x")
    zipped = runner.case([archive], guess_assignment([archive.name]), tmp_path / "s5")
    assert [p.name for p in zipped.images] == [p.name for p in phantom]

    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), flat)
    with pytest.raises(UserError) as error:
        from brats_cggm.data.validation import load_sequences

        load_sequences(runner.case([flat], {"flair": 0}, tmp_path / "s6"))
    assert user_message(error.value, tmp_path / "s6").startswith("flat.nii.gz: expected a 3-D flair image")


@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_views_of_contributions_kept_in_a_box_equal_the_full_grid(tmp_path, codes):
    """Contribution maps stored only inside their box (any voxel order) draw the same
    images as the full grid, at positions inside and outside the box."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    from brats_cggm_app.views import VIEWS, CaseViews, ViewSettings

    rng = np.random.default_rng(0)
    to_codes = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    affine = np.diag([1.0, 1.2, 2.0, 1.0]) @ inv_ornt_aff(to_codes, (18, 22, 14))
    shape = nib.orientations.apply_orientation(np.zeros((18, 22, 14)), to_codes).shape
    box = (slice(3, shape[0] - 4), slice(2, shape[1] - 1), slice(5, shape[2] - 2))
    maps = np.zeros((3, *shape), np.float32)
    maps[(slice(None), *box)] = rng.uniform(-1, 1, (3, *(s.stop - s.start for s in box)))
    labels = (maps[1] > 0.5).astype(np.uint8) * 2
    image = rng.uniform(1, 100, shape).astype(np.float32)
    full = CaseViews.create(tmp_path / "full", {"t1": image}, labels, affine, {"t1": maps})
    boxed = CaseViews.create(tmp_path / "boxed", {"t1": image}, labels, affine, {"t1": maps}, box)
    assert boxed.contributions["t1"].size < full.contributions["t1"].size
    for position in [(0, 0, 0), (9, 11, 7), tuple(n - 1 for n in full.shape), (2, 20, 13)]:
        for region in ("WT", "ET"):
            settings = ViewSettings("t1", region=region, contribution="t1")
            for view, a, b in zip(VIEWS, full.render(position, settings)[3:], boxed.render(position, settings)[3:]):
                assert np.array_equal(a, b), (position, region, view)
