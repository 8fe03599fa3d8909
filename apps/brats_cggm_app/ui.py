"""The Gradio page: upload a case, segment it, look at it, download the results.

A thin layer: uploads become cases and results in :mod:`brats_cggm_app.service` (through
``brats_cggm.inference``); the views are drawn in :mod:`brats_cggm_app.views`. The public
``segment`` endpoint serves scripts (docs/app.md); the page's own events are private.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import uuid
from html import escape
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from brats_cggm import MODALITIES
from brats_cggm.errors import UserError
from brats_cggm.inference.prediction import Prediction
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm_app.service import (
    DISPLAY_NAMES,
    Outcome,
    Runner,
    Workspace,
    describe_upload,
    guess_assignment,
    user_message,
)
from brats_cggm_app.views import (
    LABEL_COLOURS,
    LABEL_NAMES,
    NEGATIVE,
    POSITIVE,
    VIEWS,
    CaseViews,
    ViewSettings,
)

log = logging.getLogger(__name__)

REGION_NAMES = {"WT": "whole tumour (WT)", "TC": "tumour core (TC)", "ET": "enhancing tumour (ET)"}
SEQUENCE_COLOURS = {"FLAIR": "#4c78a8", "T1": "#9d9d9d", "T1ce": "#f58518", "T2": "#54a24b"}
SLIDER_LABELS = {"axial": "Axial slice (inferior → superior)", "coronal": "Coronal slice (posterior → anterior)",
                 "sagittal": "Sagittal slice (patient's left → right)"}
#: a session's result (and Gradio's cached files) are removed after this long
SESSION_SECONDS = 3600
CSS = """
.status-error { border-left: 6px solid #d32f2f; background: #fdecea; color: #611a15; padding: 8px 12px; border-radius: 4px; }
.status-ok { border-left: 6px solid #2e7d32; background: #edf7ed; color: #1e4620; padding: 8px 12px; border-radius: 4px; }
.status-info { border-left: 6px solid #607d8b; background: #f3f5f6; padding: 8px 12px; border-radius: 4px; }
.legend span.swatch { display: inline-block; width: 14px; height: 14px; margin: 0 4px -2px 12px; border: 1px solid #0004; }
table.volumes { border-collapse: collapse; width: 100%; margin: 0; }
table.volumes caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
table.volumes th, table.volumes td { padding: 3px 6px; border: none; border-bottom: 1px solid #0002; text-align: left; vertical-align: top; }
table.volumes th, table.volumes td.ml { white-space: nowrap; }
table.volumes td.ml { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
table.volumes td.what { color: var(--body-text-color-subdued); font-size: 0.9em; }
#upload td.filename { display: table-cell; overflow-wrap: anywhere; font-size: 0; }
#upload td.filename span { font-size: var(--text-md); white-space: normal; overflow: visible; text-overflow: clip; }
#upload td.download { min-width: 0; width: 7em; }
.heatbar { display: inline-block; width: 180px; height: 12px; vertical-align: middle; margin: 0 6px; border: 1px solid #0004; }
"""


def build_app(model: Path | None = None, *, workdir: Path | None = None, concurrency: int = 2,
              segmenter: Segmenter | None = None) -> gr.Blocks:
    """The app for ``model`` (an exported ``.onnx`` or a run folder; default: the shipped
    model), or for an already loaded ``segmenter``. Its files live under ``workdir``
    (default: a new temporary folder, removed at exit); Gradio's uploads and cache go there
    too (this sets ``GRADIO_TEMP_DIR`` for the process). ``concurrency``: how many
    segmentations run at once; further requests wait in the queue."""
    segmenter = segmenter or Segmenter.load(model)
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="brats-cggm-app-"))
        atexit.register(shutil.rmtree, workdir, True)
    workspace = Workspace(workdir)
    os.environ["GRADIO_TEMP_DIR"] = str(workspace.uploads)
    handlers = _Handlers(Runner(segmenter, workspace))

    with gr.Blocks(title="BraTS CGGM segmentation", delete_cache=(600, SESSION_SECONDS), analytics_enabled=False) as demo:
        views = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=_discard)
        card = segmenter.card
        gr.Markdown(
            "## Brain tumour segmentation (BraTS) with per-sequence contributions\n"
            f"Model `{Path(segmenter.source).name}`: {card.get('description') or 'no description'} "
            f"**Intended use: {card.get('intended_use') or 'research only; not for clinical use'}.**"
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                page_in = _input_panel(segmenter.allows_missing)
            with gr.Column(scale=3):
                page_out = _result_panel()
        with gr.Row(visible=False):  # the inputs and outputs of the `segment` endpoint
            api_inputs = [gr.File(label=m, file_types=[".nii", ".gz"]) for m in MODALITIES]
            api_inputs.append(gr.Checkbox(False, label="contributions"))
            api_outputs = [gr.File(label="label map"), gr.JSON(label="summary"), gr.File(label="contribution maps")]
            api_button = gr.Button()

        private = {"api_visibility": "private"}
        images = [*page_out.segmentation_images, *page_out.contribution_images]
        controls = [*page_out.sliders, page_out.background, page_out.overlay, page_out.opacity, page_out.crosshair,
                    page_out.region, page_out.contributor]
        run_inputs = [page_in.files, *page_in.pickers, page_in.method, views]
        run_outputs = [views, page_in.status, page_out.summary, *page_out.sliders, page_out.background,
                       page_out.contributor, page_out.region, *images, page_out.heat_legend, page_out.shares,
                       page_out.volumes, page_out.downloads]
        page_in.files.change(handlers.assign, page_in.files, [page_in.upload_note, *page_in.pickers],
                             show_progress="hidden", **private)
        page_in.run_button.click(_running, None, page_in.status, queue=False, **private).then(
            handlers.run_case, run_inputs, run_outputs, concurrency_id="segment", **private)
        page_in.example_button.click(_running, None, page_in.status, queue=False, **private).then(
            handlers.load_example, None, [page_in.files, page_in.upload_note, *page_in.pickers],
            concurrency_id="segment", **private,
        ).success(handlers.run_case, run_inputs, run_outputs, concurrency_id="segment", **private)
        for control in controls:
            control.input(handlers.redraw, [views, *controls], [*images, page_out.heat_legend],
                          show_progress="hidden", concurrency_limit=None, trigger_mode="always_last", **private)
        api_button.click(handlers.segment, api_inputs, api_outputs, api_name="segment", concurrency_id="segment")

    demo.queue(default_concurrency_limit=concurrency, max_size=32)
    demo.brats_workspace = workspace
    return demo


def launch(model: Path | None = None, host: str = "127.0.0.1", port: int = 7860, *, concurrency: int = 2,
           max_file_mb: int = 256, workdir: Path | None = None, block: bool = True) -> gr.Blocks:
    """Serve the app on ``host:port`` (never a public share link). ``max_file_mb``: the
    largest upload; ``block=False`` returns at once with the server running
    (``demo.close()`` stops it; ``demo.local_url`` is its address). Raises a
    ``UserError`` for a model that cannot be used."""
    demo = build_app(model, workdir=workdir, concurrency=concurrency)
    demo.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
        max_file_size=f"{int(max_file_mb)}mb", show_error=True, quiet=not block, ssr_mode=False,
        mcp_server=False, pwa=False, enable_monitoring=False, run_history=False, footer_links=["api"],
        allowed_paths=[str(demo.brats_workspace.root)], theme=_theme(), css=CSS,
    )
    return demo


# --------------------------------------------------------------------------- layout

def _input_panel(allows_missing: bool) -> SimpleNamespace:
    gr.Markdown("### 1. Input")
    files = gr.File(label="MRI: four NIfTI sequences, one 4-D NIfTI, or a zip of a case folder",
                    file_count="multiple", file_types=[".nii", ".gz", ".zip"], elem_id="upload")
    upload_note = gr.Markdown(describe_upload([]), elem_id="upload-note")
    with gr.Group():
        pickers = [gr.Dropdown(label=f"{DISPLAY_NAMES[m]} file", choices=[], value=None, elem_id=f"pick-{m}")
                   for m in MODALITIES]
    gr.Markdown("<small>" + ("This model accepts a case without some sequences." if allows_missing
                             else "This model needs all four sequences.") + "</small>")
    method = gr.Radio(["occlusion", "shapley"], value="occlusion", label="Contribution maps",
                      info="occlusion: 1 + k network passes; shapley: exact, 2^k passes (slower)")
    with gr.Row():
        run_button = gr.Button("Segment", variant="primary", elem_id="run")
        example_button = gr.Button("Example case", elem_id="example")
    status = gr.HTML(_status("info", "No case yet: upload one, or try the example case."), elem_id="status")
    return SimpleNamespace(files=files, upload_note=upload_note, pickers=pickers, method=method,
                           run_button=run_button, example_button=example_button, status=status)


def _result_panel() -> SimpleNamespace:
    gr.Markdown("### 2. Result")
    page = SimpleNamespace(summary=gr.Markdown("", elem_id="summary"))
    with gr.Row():
        page.sliders = [gr.Slider(0, 1, value=0, step=1, label=SLIDER_LABELS[v], elem_id=f"slider-{v}") for v in VIEWS]
    with gr.Tabs():
        with gr.Tab("Segmentation", id="segmentation"):
            with gr.Row():
                page.background = gr.Dropdown(choices=[], label="Background sequence", scale=1)
                page.overlay = gr.Checkbox(value=True, label="Show segmentation", scale=1)
                page.opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Opacity", scale=2)
                page.crosshair = gr.Checkbox(value=True, label="Crosshair", scale=1)
            gr.HTML(_label_legend())
            with gr.Row():
                page.segmentation_images = [_view_image(v, "segmentation") for v in VIEWS]
        with gr.Tab("Contribution maps", id="contributions"):
            with gr.Row():
                page.region = gr.Radio(list(REGION_NAMES), value="WT", label="Region", scale=1)
                page.contributor = gr.Dropdown(choices=[], label="Sequence", scale=1)
            page.heat_legend = gr.HTML(_heat_legend(None, None, None))
            with gr.Row():
                page.contribution_images = [_view_image(v, "contribution") for v in VIEWS]
    gr.Markdown("<small>Radiological convention: the patient's right is on the image's left "
                "(letters mark the directions); pixels have the voxels' aspect.</small>")
    with gr.Row():
        page.shares = gr.BarPlot(_shares_frame({}), x="region", y="share", color="sequence", color_map=SEQUENCE_COLOURS,
                                 y_lim=[0, 1], sort=list(REGION_NAMES), title="Each sequence's share of the prediction",
                                 x_title="region", y_title="share of positive contribution", height=300, scale=2,
                                 elem_id="shares")
        with gr.Column(scale=1, min_width=200):
            page.volumes = gr.HTML(_volumes_table(None), elem_id="volumes")
    page.downloads = gr.File(label="Downloads: label map (NIfTI, input geometry), contribution maps (zip), summary (JSON)",
                             file_count="multiple", interactive=False, elem_id="downloads")
    return page


def _view_image(view: str, kind: str) -> gr.Image:
    return gr.Image(label=view.capitalize(), type="numpy", format="png", interactive=False, height=360,
                    buttons=["fullscreen"], elem_id=f"{kind}-{view}")


# --------------------------------------------------------------------------- events

class _Handlers:
    """The functions the page's events call (and the ``segment`` endpoint)."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.workspace = runner, runner.workspace

    def assign(self, uploaded: list[str] | None) -> list:
        """The upload's note and each sequence's guessed file."""
        names = [Path(p).name for p in uploaded or []]
        guess = guess_assignment(names)
        return [describe_upload(names), *_pickers(names, [guess[m] for m in MODALITIES])]

    def load_example(self, progress=gr.Progress()) -> list:  # noqa: B008 (Gradio's way)
        progress(0.0, desc="Preparing the example case (first time only)")
        paths = [str(p) for p in self.workspace.example_files()]
        names = [Path(p).name for p in paths]
        return [paths, describe_upload(names), *_pickers(names, range(len(names)))]

    def run_case(self, uploaded, flair, t1, t1ce, t2, method, old_views, progress=gr.Progress()) -> list:  # noqa: B008
        if not uploaded:
            return _failed("Upload a case first (or try the example case).", old_views)
        picked = [int(i) if str(i or "").isdigit() else None for i in (flair, t1, t1ce, t2)]
        folder = self.workspace.session_folder()  # the views, and the results in folder/out
        with self.workspace.request() as staging:
            try:
                case = self.runner.case(uploaded, dict(zip(MODALITIES, picked)), staging)
                outcome = self.runner.run(case, folder / "out", method, lambda done, text: progress(done, desc=text))
                progress(0.95, desc="Drawing the views")
                new_views = self.runner.views(outcome, folder)
            except Exception as error:
                shutil.rmtree(folder, ignore_errors=True)
                if isinstance(error, UserError):
                    message = user_message(error, staging)
                else:
                    log.exception("segmentation failed")
                    message = f"internal error ({error.__class__.__name__}); the server log has the details"
                gr.Warning(message, title="Cannot segment this input")
                return _failed(message, old_views)
        _discard(old_views)
        return _show(new_views, outcome)

    def redraw(self, case_views: CaseViews | None, axial, coronal, sagittal, background, overlay, opacity,
               crosshair, region, contributor) -> list:
        if case_views is None:
            return [gr.skip()] * (2 * len(VIEWS) + 1)
        settings = ViewSettings(background or case_views.sequences[0], bool(overlay), float(opacity), bool(crosshair),
                                region or "WT", contributor)
        rendered = case_views.render((int(sagittal), int(coronal), int(axial)), settings)
        return [*rendered, _heat_legend(case_views, contributor, region)]

    def segment(self, flair: str | None, t1: str | None, t1ce: str | None, t2: str | None,
                contributions: bool = False) -> tuple[str, dict, str | None]:
        """Segment one case from up to four sequence files (the model card says whether
        one may be missing). Returns the label map (NIfTI on the input's grid), the JSON
        summary (volumes in ml, sequences used, contribution shares) and, with
        ``contributions``, a zip of the contribution maps."""
        given = {m: p for m, p in zip(MODALITIES, (flair, t1, t1ce, t2)) if p}
        if not given:
            raise gr.Error("no sequence file given", print_exception=False)
        with self.workspace.request() as staging:
            try:
                case = self.runner.case(list(given.values()), {m: i for i, m in enumerate(given)}, staging)
                outcome = self.runner.run(case, self.workspace.api_folder(), "occlusion" if contributions else None)
            except UserError as error:
                raise gr.Error(user_message(error, staging), print_exception=False) from None
        zipped = str(outcome.contributions_zip) if outcome.contributions_zip else None
        return str(outcome.label_map), outcome.summary, zipped


def _pickers(names: list[str], chosen) -> list[gr.Dropdown]:
    """The four sequence pickers over the uploaded ``names`` (values: upload indices)."""
    choices = [("—", "")] + [(name, str(index)) for index, name in enumerate(names)]
    return [gr.Dropdown(choices=choices, value="" if index is None else str(index)) for index in chosen]


def _running() -> str:
    return _status("info", "Segmenting…")


def _failed(message: str, old_views: CaseViews | None) -> list:
    """The message, and no result (an old one beside it would look like the answer); in
    the order of ``run_outputs``, as :func:`_show`."""
    _discard(old_views)
    return [None, _status("error", message), "", *[gr.skip()] * 6, *[None] * (2 * len(VIEWS)),
            _heat_legend(None, None, None), _shares_frame({}), _volumes_table(None), None]


def _show(case_views: CaseViews, outcome: Outcome) -> list:
    prediction = outcome.prediction
    used = ", ".join(DISPLAY_NAMES[m] for m in prediction.sequences_used)
    missing = ", ".join(DISPLAY_NAMES[m] for m in MODALITIES if m not in prediction.sequences_used)
    background = "t1ce" if "t1ce" in case_views.sequences else case_views.sequences[0]
    contributor = "flair" if "flair" in case_views.contributors else next(iter(case_views.contributors), None)
    start = case_views.start
    rendered = case_views.render(start, ViewSettings(background, region="WT", contribution=contributor))
    summary = (f"**{prediction.case_id}**: segmented in {prediction.seconds:.1f} s with {used}"
               + (f"; missing: {missing} (switched off)" if missing else "")
               + f". Grid {' × '.join(map(str, prediction.shape))}, voxels "
               + " × ".join(f"{z:.2f}" for z in outcome.summary["voxel_size_mm"]) + " mm. "
               + ", ".join(f"**{r} {outcome.summary['volumes_ml'][r]:.1f} ml**" for r in REGION_NAMES) + "."
               + ("" if "ingest" not in outcome.summary else " A raw examination: shown on its T1ce as acquired, without "
                  "contribution maps; the downloads add the DICOM SEG when the input was DICOM."))
    status = f"Done: sequences used {used}" + (f"; missing {missing}" if missing else "") + "."
    return [
        case_views, _status("ok", status), summary,
        *[gr.Slider(0, case_views.shape[axis] - 1, value=start[axis], step=1) for axis in (2, 1, 0)],
        gr.Dropdown(choices=[(DISPLAY_NAMES[m], m) for m in case_views.sequences], value=background),
        gr.Dropdown(choices=[(DISPLAY_NAMES[m], m) for m in case_views.contributors], value=contributor),
        gr.Radio(value="WT"),
        *rendered,
        _heat_legend(case_views, contributor, "WT"),
        _shares_frame(prediction.shares()), _volumes_table(prediction),
        [str(p) for p in (outcome.label_map, outcome.contributions_zip, outcome.summary_file, *outcome.extra_files) if p],
    ]


def _discard(case_views: CaseViews | None) -> None:
    if case_views is not None:
        case_views.discard()


# --------------------------------------------------------------------------- pieces

def _theme() -> gr.themes.Base:
    """The default look with local fonts (no font downloads: the page works offline)."""
    font = gr.themes.Font
    return gr.themes.Default(font=[font("DejaVu Sans"), font("Helvetica"), font("Arial"), font("sans-serif")],
                             font_mono=[font("DejaVu Sans Mono"), font("monospace")])


def _status(kind: str, text: str) -> str:
    """A status line; ``data-update`` differs every time, so that a page (or a test) can
    tell a new message from an equal old one."""
    return f'<div class="status-{kind}" role="status" data-update="{uuid.uuid4().hex[:12]}">{escape(text)}</div>'


def _label_legend() -> str:
    items = "".join(f'<span class="swatch" style="background: rgb{LABEL_COLOURS[v]}"></span>{LABEL_NAMES[v]} (label {v})'
                    for v in (1, 2, 4))
    return f'<div class="legend">{items}</div>'


def _heat_legend(case_views: CaseViews | None, sequence: str | None, region: str | None) -> str:
    if case_views is None or sequence not in case_views.scale:
        return "<div class='legend'>Contribution maps appear after a segmentation.</div>"
    top = case_views.scale[sequence][region]
    negative, positive = (f"rgb({int(r)},{int(g)},{int(b)})" for r, g, b in (NEGATIVE, POSITIVE))
    name = DISPLAY_NAMES[sequence]
    return (
        f"<div class='legend'>−{top:.2f} <span class='heatbar' style='background: linear-gradient(to right, "
        f"{negative}, transparent, {positive})'></span> +{top:.2f} &nbsp; "
        f"<b>red</b>: the {REGION_NAMES[region]} probability drops without {name} ({name} supports it there); "
        f"<b>blue</b>: {name} argues against it. White outline: the predicted {region}.</div>"
    )


def _shares_frame(shares: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Every region and sequence, 0 where there is no share (Gradio's bar plot keeps the
    colours of the first frame it is given, so every sequence is there from the start)."""
    rows = [{"region": region, "sequence": DISPLAY_NAMES[m], "share": round(shares.get(region, {}).get(m, 0.0), 4)}
            for region in REGION_NAMES for m in MODALITIES]
    return pd.DataFrame(rows).astype({"region": str, "sequence": str, "share": float})


def _volumes_table(prediction: Prediction | None) -> str:
    """Each region's and label's volume: the short name, the number (never wrapped or cut
    off), then the long name, which wraps when the column is narrow."""
    volumes = prediction.volumes_ml() if prediction is not None else {}
    rows = [(region, volumes.get(region), REGION_NAMES[region].split(" (")[0]) for region in REGION_NAMES]
    for value in (1, 2, 4):
        short, _, name = LABEL_NAMES[value].partition(" ")
        rows.append((f"{short} ({value})", next((v for k, v in volumes.items() if k.startswith(f"label {value} ")), None),
                     f"{name}, label {value}"))
    cells = "".join(f"<tr><th>{escape(short)}</th><td class='ml'>{'–' if ml is None else f'{ml:.2f}'}</td>"
                    f"<td class='what'>{escape(what)}</td></tr>" for short, ml, what in rows)
    return f"<table class='volumes'><caption>Volumes (ml)</caption>{cells}</table>"
