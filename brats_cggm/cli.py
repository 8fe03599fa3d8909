"""``brats-cggm``: the command line of the BraTS application.

Each command imports what it needs when it runs, so that ``check`` and ``predict`` (with
an ONNX file) work in the torch-free install (``pip install brats-cggm``); a command that
needs a package that install lacks says which extra brings it (:func:`missing_extra`)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from brats_cggm.errors import ConfigurationError
from multimodal_general.cli_support import (
    OWN_OPTIONS,
    make_app,
    parse_balancer_options,
    parse_settings,
    run_app,
)
from multimodal_general.cli_support import progress_bar as shared_progress_bar
from multimodal_general.resume import check_resume

app = make_app("Brain-tumour segmentation on BraTS MRI with CGGM-balanced training.")
console = Console()

LayoutOption = Annotated[
    str | None,
    typer.Option(help="brats2021, brats2023 or msd (default: detected from the file names)"),
]
PostprocessingOption = Annotated[str, typer.Option(
    help="clean-up after the network: card (the model card's rules, none if it has none), off, or a JSON "
         "file of rules (docs/inference.md)")]
TtaOption = Annotated[bool | None, typer.Option(
    "--tta/--no-tta", help="average over the 8 mirrorings of each window (8x slower; default: as the model card says)",
    show_default=False)]
# the raw path's sequence overrides (ingest, predict --raw)
FlairOption = Annotated[str | None, typer.Option("--flair", help="the FLAIR series: its number, description or path in the case")]
T1Option = Annotated[str | None, typer.Option("--t1", help="the T1 series (as --flair)")]
T1ceOption = Annotated[str | None, typer.Option("--t1ce", help="the T1ce series (as --flair)")]
T2Option = Annotated[str | None, typer.Option("--t2", help="the T2 series (as --flair)")]
SkipOption = Annotated[list[str] | None, typer.Option(
    "--skip", help="a series (number, description or path; a folder leaves out all it holds) that is none of the four (repeatable)")]
BalancerOption = Annotated[list[str] | None, typer.Option(
    "--balancer-option",
    help="a baseline's hyperparameter, e.g. alpha=0.5 (repeatable; = --set balancer.options.NAME=VALUE)")]


def balancer_settings(items: list[str] | None, own: dict[str, str] | None = None) -> dict[str, object]:
    """``--balancer-option NAME=VALUE`` items as ``balancer.options.NAME`` settings."""
    return {f"balancer.options.{name}": value for name, value in parse_balancer_options(items, own).items()}


def progress_bar() -> Progress:
    return shared_progress_bar(console, elapsed=False, transient=True)


#: the extra that installs each optional top-level module (pip install 'brats-cggm[EXTRA]')
EXTRAS = {
    **dict.fromkeys(("torch", "monai", "torchio", "SimpleITK", "onnxscript", "matplotlib", "scipy", "sklearn", "h5py",
                     "nilearn", "yaml", "tensorboard"), "train"),
    "gradio": "app", "transformers": "food", "itk": "itk", "pydicom": "raw", "highdicom": "raw",
}


#: what the raw path needs (ingest, predict --raw): the lighter `raw` extra brings them
RAW_MODULES = {"SimpleITK", "pydicom", "highdicom", "nilearn"}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """One line for a command that needs a module this install lacks, naming the extra
    that brings it; None for a module no extra provides (a real bug: re-raised)."""
    module = (error.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if module in RAW_MODULES and ("ingest" in sys.argv[1:2] or "--raw" in sys.argv):
        extra = "raw"
    if extra is None:
        return None
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "this command")
    return (f"`brats-cggm {command}` needs {module}, which this install lacks: "
            f"pip install 'brats-cggm[{extra}]' (the torch-free install runs check and predict with an .onnx model)")


@app.command()
def info() -> None:
    """Show the installed stack and the compute devices it can use."""
    import importlib.metadata

    import onnxruntime

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return f"not installed (pip install 'brats-cggm[{EXTRAS.get(name, 'train')}]')"

    table = Table(title="brats-cggm environment", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("torch", version("torch"))
    table.add_row("monai", version("monai"))
    table.add_row("onnxruntime", f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})")
    try:
        import torch
    except ModuleNotFoundError:
        table.add_row("CPU cores", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    else:
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        table.add_row("CUDA devices", ", ".join(gpus) if gpus else "none (CPU only)")
        table.add_row("CPU threads", str(torch.get_num_threads()))
    console.print(table)


@app.command("models")
def list_models(
    name: Annotated[str | None, typer.Argument(help="a shipped model: print its card")] = None,
) -> None:
    """List the models shipped in the package (use a name with --model), or print one's card."""
    import json

    from brats_cggm import models

    if name is not None:
        model = models.find(name)
        console.print(f"{model.name}: {model.path}", highlight=False, soft_wrap=True)
        console.print_json(json.dumps(model.card))
        return
    table = Table(title=f"shipped models ({models.folder()})")
    for column in ("name", "task", "network", "MB", "description"):
        table.add_column(column, overflow="fold", no_wrap=column != "description",
                         justify="right" if column == "MB" else "left")
    for model in models.available():
        network = model.card.get("network", {})
        table.add_row(model.name + (" (default)" if model.is_default else ""), model.task,
                      str(network.get("preset", "")), f"{model.path.stat().st_size / 2**20:.1f}",
                      model.card.get("description", ""))
    console.print(table)


@app.command()
def check(
    data_dir: Annotated[Path, typer.Argument(help="folder with BraTS cases")],
    layout: LayoutOption = None,
    partial: Annotated[bool, typer.Option(
        help="a case that lacks sequences is a case (as train --partial reads it), not a problem")] = False,
) -> None:
    """Validate every case: files, shapes, affines, label values, voxel values.

    Exit status 0 when every case is fine, 2 otherwise.
    """
    from brats_cggm import MODALITIES
    from brats_cggm.data.layouts import describe_sequences, discover
    from brats_cggm.data.validation import inspect_case

    found = discover(data_dir, layout, partial=partial)
    total = len(found.cases) + len(found.problems)
    table = Table(title=f"{total} case(s) in {data_dir} (layout {found.layout})")
    for column in ("case", "sequences", "shape", "spacing (mm)", "orientation", "labels", "problems"):
        table.add_column(column, overflow="fold", no_wrap=column == "case")
    problems = [str(p) for p in found.problems]
    bad_cases = len(found.problems)
    for problem in found.problems:
        table.add_row(problem.path.name, "—", "—", "—", "—", "—", "[red]1[/]")
    with progress_bar() as progress:
        for case in progress.track(found.cases, description="checking"):
            report = inspect_case(case)
            problems += [str(p) for p in report.problems]
            bad_cases += not report.ok
            held = [m for m, p in zip(MODALITIES, case.images) if p is not None] if len(case.images) > 1 else MODALITIES
            table.add_row(
                case.case_id,
                "all four" if len(held) == len(MODALITIES) else ", ".join(held),
                "x".join(map(str, report.shape)) if report.shape else "—",
                "x".join(f"{s:.3g}" for s in report.spacing) if report.spacing else "—",
                report.orientation or "—",
                ",".join(map(str, report.label_values)) if report.label_values is not None else ("—" if case.label else "no label"),
                "[green]ok[/]" if report.ok else f"[red]{len(report.problems)}[/]",
            )
    console.print(table)
    for line in problems:
        console.print(f"[red]problem:[/] {line}", highlight=False, soft_wrap=True)
    if bad_cases:
        if not partial and any("missing sequence" in p.problem for p in found.problems):
            console.print("cases that lack sequences can train with `train --partial` (`check --partial` accepts them)")
        console.print(f"[bold red]{bad_cases} of {total} case(s) have problems[/] ({len(problems)} problem(s))")
        raise typer.Exit(2)
    console.print(f"[bold green]all {total} case(s) are fine[/]"
                  + (f" ({describe_sequences(found.cases)})" if partial else ""))


@app.command()
def split(
    data_dir: Annotated[Path, typer.Argument(help="folder with BraTS cases")],
    out: Annotated[Path, typer.Option(help="the split JSON file to write")],
    folds: Annotated[int | None, typer.Option(help="k-fold cross-validation")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="one split with this fraction in validation")] = None,
    seed: int = 0,
    layout: LayoutOption = None,
) -> None:
    """Write a deterministic train/validation split of the cases (k folds or a ratio)."""
    from brats_cggm.data.layouts import discover
    from brats_cggm.data.splits import make_split, save_split

    if folds is None and val_fraction is None:
        val_fraction = 0.2
    found = discover(data_dir, layout)
    result = make_split([c.case_id for c in found.cases], folds=folds, val_fraction=val_fraction, seed=seed)
    save_split(result, out)
    sizes = ", ".join(f"{len(f['train'])}/{len(f['val'])}" for f in result["folds"])
    console.print(f"wrote {out}: {result['scheme']}, seed {seed}, train/val per fold: {sizes}")


@app.command()
def phantom(
    out: Annotated[Path, typer.Option(help="folder to write the cases into")],
    cases: Annotated[int, typer.Option(help="how many cases")] = 10,
    size: Annotated[
        str, typer.Option(help="grid: 64 (a cube), 96 128 80, or 96x128x80; default BraTS's 240 240 155 at 1 mm")
    ] = "240x240x155",
    layout: Annotated[str, typer.Option(help="brats2021, brats2023 or msd")] = "brats2021",
    seed: int = 0,
) -> None:
    """Write phantom BraTS cases (the embedded default data): four MRI sequences and a
    label map each, from a deformed MNI152 brain with synthetic tumours."""
    from brats_cggm.data.phantom import grid_size, write_phantoms

    grid = grid_size(size)
    if cases < 1:
        raise ConfigurationError(f"--cases must be at least 1, got {cases}")
    with progress_bar() as bar:
        task = bar.add_task("writing phantoms", total=cases)
        written = write_phantoms(
            out, cases, grid, layout, seed, progress=lambda done, total: bar.update(task, completed=done)
        )
    console.print(f"wrote {len(written)} {layout} case(s) of {'x'.join(map(str, grid))} voxels to {out}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="the run folder (config, checkpoints, metrics, plots)")],
    data: Annotated[Path | None, typer.Option(help="folder with BraTS cases")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration; these options override it")] = None,
    preset: Annotated[str | None, typer.Option(help="starting configuration: cpu-small (default; phantoms, minutes), cpu-real (real scans at 2 mm, ~15-30 min) or gpu")] = None,
    balancer: Annotated[str | None, typer.Option(help="none, cggm, mmpareto, agm, mslr or gblending")] = None,
    balancer_option: BalancerOption = None,
    cggm_preset: Annotated[str | None, typer.Option(
        help="CGGM variant: stable, paper, official or deficit (ours: B from each head's deficit)")] = None,
    rho: Annotated[float | None, typer.Option(
        help="CGGM's rho (how strongly the modalities are rebalanced; = --set balancer.rho=V)")] = None,
    lam: Annotated[float | None, typer.Option(
        help="CGGM's lambda (weight of the direction loss; = --set balancer.lam=V)")] = None,
    network: Annotated[str | None, typer.Option(help="small, default or early_fusion")] = None,
    epochs: Annotated[int | None, typer.Option(help="total epochs (with --resume: extends the run)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="any setting, e.g. --set optim.momentum=0.9 (repeatable)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    init: Annotated[Path | None, typer.Option(
        help="start from the network weights of another run (its best.pt) or checkpoint, e.g. phantom pre-training")] = None,
    partial: Annotated[bool, typer.Option(
        help="also train on cases that lack sequences (e.g. FLAIR and T1ce only): their absent sequences are "
             "switched off (= --set data.partial=true)")] = False,
) -> None:
    """Train the segmentation network with a balancer (CGGM by default).

    Runs the same on a CPU, a GPU, or several GPUs/processes under
    `torchrun --nproc_per_node=N $(which brats-cggm) train ...`. Ctrl-C saves a checkpoint;
    `--resume` continues exactly where it stopped.
    """
    from brats_cggm.training import Trainer, start, stop
    from brats_cggm.training.progress import EpochProgress

    overrides = {
        "data.dir": str(data.resolve()) if data else None,  # absolute: resumable from anywhere
        "balancer.name": balancer, "balancer.preset": cggm_preset, "balancer.rho": rho, "balancer.lam": lam,
        "network.preset": network, "optim.epochs": epochs, "optim.lr": lr, "seed": seed, "device": device,
        "init": str(init.resolve()) if init else None, "data.partial": True if partial else None,
        **balancer_settings(balancer_option, OWN_OPTIONS),
        **parse_settings(settings or []),
    }
    resolved = _resumed_config(out, preset, config, overrides, epochs) if resume else _new_config(preset, config, overrides)
    place = start(resolved.device)
    try:
        main_console = console if place.is_main else Console(quiet=True)
        if place.is_main:
            main_console.print(f"training on {place.device} x {place.world_size} process(es); run folder {out}")
        trainer = Trainer(resolved, out, place, resume=resume, report=main_console.print,
                          progress=EpochProgress(main_console) if place.is_main else None)
        if resume and place.is_main:
            resolved.save(out / "config.yaml")  # --epochs may have changed
        summary = trainer.fit()
    finally:
        stop()
    if place.is_main:
        _report_training(summary, out, place.world_size)


def _new_config(preset: str | None, config: Path | None, overrides: dict):
    """A new run's configuration: the preset, then the configuration file, then the options."""
    from brats_cggm.training import resolve_config

    return resolve_config(preset or "cpu-small", config, overrides)


def _resumed_config(out: Path, preset: str | None, config: Path | None, overrides: dict, epochs: int | None):
    """A resumed run's configuration: the run's own, with ``--epochs`` when given; any other
    setting that this command line asks to change is an error (:func:`check_resume`)."""
    from brats_cggm.training import resolve_config

    saved = resolve_config("cpu-small", out / "config.yaml")
    # what this command line asks for: all of it with --preset/--config, else the run's with the options given
    asked = (_new_config(preset, config, overrides) if preset or config
             else resolve_config("cpu-small", out / "config.yaml", overrides))
    check_resume(saved.differences(asked), "optim.epochs")
    return resolve_config("cpu-small", out / "config.yaml", {"optim.epochs": epochs})


def _report_training(summary: dict, out: Path, processes: int) -> None:
    best = summary["best_val_dice_mean"]
    console.print(
        f"[bold green]done[/]: best mean validation Dice {best:.3f} at epoch {summary['best_epoch']}; "
        f"{out}/checkpoints/best.pt, plots in {out}/plots"
    )
    if "ranks_consistent" in summary:
        state = "identical on" if summary["ranks_consistent"] else "[bold red]DIFFERENT[/] across"
        console.print(f"network and balancer state {state} all {processes} processes")


@app.command()
def compare(
    data: Annotated[Path, typer.Option(help="folder with BraTS cases (training and validation)")],
    out: Annotated[Path, typer.Option(help="the comparison folder (runs, results.md|csv|json|png)")],
    test_data: Annotated[Path | None, typer.Option(
        help="held-out cases, all scored (default: the cases of --data that the split leaves out)")] = None,
    methods: Annotated[str, typer.Option(
        help="comma-separated, or all (none, cggm, mmpareto, agm, mslr, gblending, modality_dropout, early_fusion, "
             "early_fusion_dropout)",
    )] = "all",
    seeds: Annotated[int, typer.Option(help="seeds per method (0, 1, ...)")] = 3,
    preset: Annotated[str, typer.Option(help="starting configuration of every run: cpu-small, cpu-real or gpu")] = "cpu-small",
    epochs: Annotated[int | None, typer.Option(help="epochs of every run (default: the preset's)")] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="a setting for every run, e.g. --set optim.lr=0.001 (repeatable)")
    ] = None,
    balancer_option: BalancerOption = None,
    subsets: Annotated[bool, typer.Option(
        help="also score the test cases with each of the 15 non-empty subsets of the sequences")] = False,
    checkpoint: Annotated[str, typer.Option(
        help="best: each run selected on its validation cases; last: a fixed budget, no selection")] = "best",
    reference: Annotated[str | None, typer.Option(
        help="the method every other is compared to case by case (default: the first)")] = None,
) -> None:
    """Train every method x seed with the same budget, select each run on its validation cases
    (or not: --checkpoint last), score it on held-out cases, compare each method to a reference
    case by case, and write one table (runs already done are reused)."""
    from brats_cggm.compare import CHECKPOINTS, aggregate, parse_methods
    from brats_cggm.compare import compare as run_comparison
    from brats_cggm.metrics import REGIONS
    from brats_cggm.training.progress import EpochProgress

    shared = {**balancer_settings(balancer_option), **parse_settings(settings or []),
              **({"optim.epochs": epochs} if epochs is not None else {})}
    runs = run_comparison(data, methods, seeds, out, test_data=test_data, preset=preset, settings=shared,
                          report=console.print, progress=EpochProgress(console), subsets=subsets,
                          checkpoint=checkpoint, reference=reference)
    rows = aggregate(runs, parse_methods(methods))
    table = Table(title=f"test Dice (mean ± std over seeds), each run's checkpoint {CHECKPOINTS[checkpoint]}")
    for column in ("method", "seeds", *REGIONS, "mean", "min/run"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        dice = [row[f"test_dice/{r}"] for r in (*REGIONS, "mean")]
        table.add_row(row["method"], str(row["runs"]), *(f"{m:.3f} ± {s:.3f}" for m, s in dice),
                      f"{row['train_s'][0] / 60:.1f}")
    console.print(table)
    console.print(f"[bold green]done[/]: {out}/results.md (with the heads, validation Dice and the paired per-case "
                  "differences to the reference), results.csv, results.json, results.png; per run: scores/")


@app.command()
def evaluate(
    run: Annotated[Path | None, typer.Option(help="a run folder written by `brats-cggm train`")] = None,
    model: Annotated[Path | None, typer.Option(
        help="a shipped model's name or an exported .onnx file, scored on every labelled case of --data "
             "(default without --run: the shipped brats_cggm_real)")] = None,
    data: Annotated[Path | None, typer.Option(help="folder with labelled BraTS cases (a run's default: its own)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="where a model's results go (default: evaluation/<model name>); a run's go to RUN/evaluation/<split>")] = None,
    split: Annotated[str | None, typer.Option(
        help="a run's val (its validation cases, the default), test (the test cases its split names, else every "
             "case it never saw), train (the cases it trained on: a fit check) or all")] = None,
    checkpoint: Annotated[str, typer.Option(help="a run's best or last")] = "best",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    subsets: Annotated[bool, typer.Option(
        help="also score each of the 15 non-empty subsets of the sequences (the others switched off)")] = False,
    postprocessing: PostprocessingOption = "card",
    tta: TtaOption = None,
) -> None:
    """Score a trained run or an exported model per case (Dice and HD95 of TC, WT, ET on each
    case's own grid)."""
    from brats_cggm import models
    from brats_cggm.evaluation import evaluate as evaluate_run
    from brats_cggm.evaluation import evaluate_model

    if run is not None and (model is not None or out is not None):
        raise ConfigurationError("--model and --out score an exported model; a run's results go to RUN/evaluation")
    if run is None and data is None:
        raise ConfigurationError("scoring a model needs --data DIR, a folder of labelled BraTS cases")
    if run is None and split not in (None, "all"):
        raise ConfigurationError("--split picks a run's cases; a model is scored on every case of --data")
    name = run.name if run is not None else models.resolve(model).stem
    with progress_bar() as bar:
        def track(items, text):
            return bar.track(items, description=text)

        if run is not None:
            rows, summary, folder = evaluate_run(run, data, split or "val", checkpoint, device, track, subsets,
                                                 postprocessing, tta)
        else:
            rows, summary, folder = evaluate_model(model, data, out or Path("evaluation") / name, device, track,
                                                   subsets, postprocessing, tta)
    if subsets:
        console.print(_subset_table(summary["subsets"], f"{name}: Dice with each subset of the sequences"))
    which = f", {checkpoint} checkpoint" if run is not None else ""
    console.print(_metrics_table(summary["metrics"], f"{name}: {len(rows)} {summary['split']} case(s){which}"))
    more = f", per case and subset: {folder / 'subsets.csv'}" if subsets else ""
    console.print(f"per-case results: {folder / 'cases.csv'}; summary: {folder / 'summary.json'}{more}")


def _metrics_table(metrics: dict, title: str) -> Table:
    """Mean ± std over cases of each region's Dice and HD95, classic and lesion-wise."""
    from brats_cggm.lesion_metrics import DILATION, HD95_UNMATCHED, MIN_LESION_MM3
    from brats_cggm.metrics import REGIONS

    out = Table(title=f"{title}, mean ± std over cases", caption=(
        f"lesion-wise: BraTS 2023's (reference lesions dilated {DILATION} voxels to match, lesions of "
        f"{MIN_LESION_MM3:g} mm³ or less ignored, each unmatched lesion or predicted component scores Dice 0 "
        f"and HD95 {HD95_UNMATCHED:g} mm)"))
    columns = (("dice", "Dice", 3), ("hd95", "HD95 mm", 1), ("lesion_dice", "lesion-wise Dice", 3),
               ("lesion_hd95", "lesion-wise HD95 mm", 1))  # key, header, decimals
    out.add_column("region")
    for _, header, _ in columns:
        out.add_column(header, justify="right")
    for region in REGIONS:
        cells = ((metrics[f"{key}/{region}"], decimals) for key, _, decimals in columns)
        out.add_row(region, *(f"{m['mean']:.{d}f} ± {m['std']:.{d}f}" for m, d in cells))
    return out


def _subset_table(table: dict, title: str) -> Table:
    """The 15-subset table: one row per subset, then the average and the worst subset."""
    from brats_cggm.metrics import REGIONS

    out = Table(title=title)
    out.add_column("sequences")
    for region in REGIONS:
        out.add_column(f"Dice {region}", justify="right")
    for subset, dice in table["subsets"].items():
        out.add_row(subset, *(f"{dice[f'dice/{r}']:.3f}" for r in REGIONS))
    out.add_section()
    out.add_row("[bold]average of the 15[/]", *(f"[bold]{table['average'][f'dice/{r}']:.3f}[/]" for r in REGIONS))
    worst = table["worst"]
    out.add_row(f"worst: {worst['subset']}", *(f"{worst[f'dice/{r}']:.3f}" for r in REGIONS))
    return out


@app.command()
def export(
    run: Annotated[list[Path], typer.Option(
        help="a run folder written by `brats-cggm train`; repeat it for a fold ensemble (one graph averaging "
             "the runs' probabilities)")],
    out: Annotated[Path, typer.Option(help="the ONNX file to write, e.g. models/NAME.onnx")],
    checkpoint: Annotated[str, typer.Option(help="best or last")] = "best",
    parity_cases: Annotated[int, typer.Option(help="validation cases of the run to check parity on")] = 1,
    description: Annotated[str, typer.Option(help="what the model is, for its card (e.g. the data it saw)")] = "",
    evaluation: Annotated[Path | None, typer.Option(
        help="a JSON file of results on cases the model (or its recipe) never saw, stored in the card")] = None,
    postprocessing: Annotated[Path | None, typer.Option(
        help="a JSON file of clean-up rules (docs/inference.md) the card carries and every inference applies")] = None,
    tta: Annotated[bool, typer.Option(help="predictions average the 8 mirrorings unless told otherwise (in the card)")] = False,
) -> None:
    """Export the trained network (no auxiliary heads) to ONNX with its model card, after
    checking the graph and its parity with torch; several --run make one ensemble model."""
    from brats_cggm.export import card_path, export_run

    with console.status("exporting to ONNX and checking parity"):
        card = export_run(run, out, checkpoint, parity_cases, description, evaluation, postprocessing, tta)
    parity = card["parity"]
    console.print(
        f"wrote {out} and {card_path(out)}: opset {card['opset']}, max |p_onnx - p_torch| = "
        f"{parity['max_abs_diff_probabilities']:.1e} on {parity['random_batches']} random batch(es) and "
        f"{parity['real_patches']} real patch(es)"
    )


def _ingested(folder: Path, case_id: str, index: int, overrides: dict, skip: list[str] | None):
    """Run the raw chain on one case, printing its identification table."""
    from brats_cggm.raw.ingest import Ingest

    ingest = Ingest(case_id, folder, overrides, skip or ())
    try:
        return ingest.run(index)
    finally:
        if getattr(ingest, "renamed", None):
            console.print(f"note: {ingest.renamed}", highlight=False)
        if getattr(ingest, "decisions", None):
            table = Table(title=f"{ingest.case_id}: sequences", title_justify="left")
            for column in ("series", "sequence", "identified by"):
                table.add_column(column, overflow="fold")
            for decision in ingest.decisions:
                row = decision.row()
                table.add_row(escape(row["series"]), row["sequence"].upper(), escape(row["reason"]))
            console.print(table)


@app.command()
def ingest(
    raw: Annotated[list[Path], typer.Argument(help="a folder of cases (one sub-folder each), one case folder, or a .zip of either")],
    out: Annotated[Path, typer.Option(help="folder for the BraTS-ready cases")],
    flair: FlairOption = None, t1: T1Option = None, t1ce: T1ceOption = None, t2: T2Option = None,
    skip: SkipOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace cases already in --out")] = False,
) -> None:
    """Raw examinations -> BraTS-ready cases: DICOM series or NIfTI files on their own grids,
    skull on, become four co-registered, skull-stripped 1 mm sequences in MNI152 space.

    Per case: identify the sequences (a table says how; --flair/--t1/--t1ce/--t2 decide),
    register FLAIR, T1, T2 rigidly to the T1ce and the T1ce to the MNI152 atlas, extract the
    brain (deepbet, shipped; skull-stripped input passes through), resample each sequence
    once. Writes OUT/<case>/<case>_{flair,t1,t1ce,t2}.nii.gz, the brain mask and ingest.json
    (series, identification, transforms, metrics, brain volume; no patient identifier).
    A case that fails is reported and the others go on; exit status 2 if any failed.
    """
    from brats_cggm.errors import UserError
    from brats_cggm.raw.cases import raw_cases
    from brats_cggm.raw.ingest import write_case

    overrides = {"flair": flair, "t1": t1, "t1ce": t1ce, "t2": t2}
    failures, written = [], []
    with raw_cases(raw) as cases:
        for index, (case_id, folder) in enumerate(cases, 1):
            if not overwrite and (out / case_id).exists():
                console.print(f"skipped {case_id}: already in {out} (--overwrite replaces it)")
                continue
            try:
                with console.status(f"ingesting {case_id}"):
                    case = _ingested(folder, case_id, index, overrides, skip)
                    path = write_case(case, out, overwrite)
            except UserError as error:
                failures.append(str(error))
                console.print(f"[red]failed:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
                continue
            record = case.record
            written.append(path)
            console.print(
                f"{case.case_id}: {', '.join(record['sequences_present'])} -> {path} "
                f"(brain {record['brain']['volume_ml']:.0f} ml, {sum(record['seconds'].values()):.1f} s)"
                + (f"; missing: {', '.join(record['sequences_missing'])}" if record["sequences_missing"] else ""),
                highlight=False, soft_wrap=True)
    if failures:
        console.print(f"[bold red]{len(failures)} case(s) failed[/]")
        raise typer.Exit(2)
    console.print(f"[bold green]{len(written)} case(s) ready in {out}[/] (brats-cggm check {out})")


@app.command()
def predict(
    inputs: Annotated[
        list[Path], typer.Option("--input", help="a folder of cases (any layout), or the files of one case (repeat --input)")
    ],
    out: Annotated[Path, typer.Option(help="folder for the label maps and their JSON summaries")],
    model: Annotated[
        Path | None, typer.Option(help="a shipped model's name (brats-cggm models), an exported .onnx file or a run "
                                       "folder (default: the shipped brats_cggm_real)")
    ] = None,
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider: cpu or cuda")] = "cpu",
    device: Annotated[str, typer.Option(help="torch device for a run folder: cpu or cuda")] = "cpu",
    tta: TtaOption = None,
    contributions: Annotated[bool, typer.Option(help="write each sequence's contribution map and shares")] = False,
    method: Annotated[str, typer.Option(help="contribution method: occlusion (1 + k passes) or shapley (2^k passes, exact)")] = "occlusion",
    probabilities: Annotated[bool, typer.Option(help="also write the TC/WT/ET probability maps")] = False,
    label_scheme: Annotated[str, typer.Option(help="numbering of the label map: brats2021 (1, 2, 4) or brats2023 (1, 2, 3)")] = "brats2021",
    overwrite: Annotated[bool, typer.Option(help="redo cases whose results are already in --out")] = False,
    layout: LayoutOption = None,
    postprocessing: PostprocessingOption = "card",
    raw: Annotated[bool, typer.Option(
        "--raw", help="the input is raw examinations (DICOM series or NIfTI files, own grids, skull on): ingest "
                      "them, segment, map the labels back to the T1ce series' grid")] = False,
    flair: FlairOption = None, t1: T1Option = None, t1ce: T1ceOption = None, t2: T2Option = None,
    skip: SkipOption = None,
) -> None:
    """Segment one case or a folder of cases; results keep each input's grid and header.

    Writes CASE.nii.gz (labels), CASE.json (volumes in ml, sequences used, contribution
    shares) and, when asked, probability and contribution maps. A case that fails is
    reported and the others go on; the exit status is 1 if any failed.

    --raw writes OUT/CASE/CASE_seg.nii.gz on the T1ce series' grid, CASE_seg.dcm (DICOM SEG),
    CASE.json, atlas/ and brats/ (docs/raw_scans.md).
    """
    from brats_cggm.errors import UserError
    from brats_cggm.inference.contributions import METHODS
    from brats_cggm.inference.inputs import find_cases
    from brats_cggm.inference.outputs import is_done, write_prediction
    from brats_cggm.inference.segmenter import OUTPUT_SCHEMES, Segmenter

    if method not in METHODS:
        raise ConfigurationError(f"--method must be one of {', '.join(METHODS)}; got '{method}'")
    if label_scheme not in OUTPUT_SCHEMES:
        raise ConfigurationError(f"--label-scheme must be one of {', '.join(OUTPUT_SCHEMES)}; got '{label_scheme}'")
    segmenter = Segmenter.load(model, provider=provider, device=device, postprocessing=postprocessing, tta=tta)
    console.print(segmenter.applied(), highlight=False, soft_wrap=True)
    if raw:
        return _predict_raw(segmenter, inputs, out, label_scheme, overwrite, {"flair": flair, "t1": t1, "t1ce": t1ce, "t2": t2}, skip)
    cases, problems = find_cases(inputs, layout)
    failures = [str(p) for p in problems]
    for problem in failures:
        console.print(f"[red]failed:[/] {problem}", highlight=False, soft_wrap=True)
    done, skipped = [], []
    with progress_bar() as bar:
        windows = bar.add_task("windows", total=None, visible=False)
        for case in bar.track(cases, description="segmenting"):
            if not overwrite and is_done(out, case.case_id):
                skipped.append(case.case_id)
                continue
            bar.reset(windows, total=None, visible=True, description=f"  {case.case_id}: windows")
            try:
                prediction = segmenter.predict_case(
                    case, contributions=method if contributions else None, label_scheme=label_scheme,
                    progress=lambda done, total: bar.update(windows, completed=done, total=total))
                done.append(write_prediction(prediction, out, probabilities, segmenter.model_info))
            except UserError as error:
                failures.append(str(error))
                console.print(f"[red]failed:[/] {error}", highlight=False, soft_wrap=True)
    _report_cases(done, skipped, failures, out)


def _report_cases(done: list[dict], skipped: list[str], failures: list[str], out: Path) -> None:
    """The volume table of the segmented cases, the skipped and the failed; exit 1 if any failed."""
    if done:
        console.print(_volume_table(done, out))
    if skipped:
        console.print(f"skipped {len(skipped)} case(s) already in {out} (--overwrite redoes them)")
    if failures:
        console.print(f"[bold red]{len(failures)} case(s) failed[/]")
        raise typer.Exit(1)


def _predict_raw(segmenter, inputs: list[Path], out: Path, label_scheme: str, overwrite: bool, overrides: dict,
                 skip: list[str] | None) -> None:
    """``predict --raw``: ingest, segment and map back each raw case (raw/native.py)."""
    from brats_cggm.errors import UserError
    from brats_cggm.raw.cases import raw_cases
    from brats_cggm.raw.native import native_prediction, write_raw_prediction

    failures, done, skipped = [], [], []
    with raw_cases(inputs) as cases:
        for index, (case_id, folder) in enumerate(cases, 1):
            if not overwrite and (out / case_id / f"{case_id}.json").is_file():
                skipped.append(case_id)
                continue
            try:
                with console.status(f"{case_id}: ingesting"):
                    case = _ingested(folder, case_id, index, overrides, skip)
                with console.status(f"{case.case_id}: segmenting"):
                    prediction = segmenter.predict_arrays(case.arrays, case.atlas_affine, case.case_id,
                                                          label_scheme=label_scheme)
                    native = native_prediction(prediction, case, segmenter.threshold, label_scheme)
                    report = write_raw_prediction(prediction, native, case, out, segmenter.model_info, overwrite=True)
            except UserError as error:
                failures.append(str(error))
                console.print(f"[red]failed:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
                continue
            done.append({"case_id": case.case_id, "volumes_ml": report["volumes_ml"],
                         "sequences_used": report["sequences_used"],
                         "seconds": sum(report["seconds"]["ingest"].values()) + report["seconds"]["segment"]})
    _report_cases(done, skipped, failures, out)


def _volume_table(done: list[dict], out: Path) -> Table:
    """One row per segmented case: its tumour volumes, the sequences used and the seconds taken."""
    table = Table(title=f"{len(done)} case(s) segmented into {out}")
    for column in ("case", "WT ml", "TC ml", "ET ml", "sequences", "s"):
        table.add_column(column, justify="left" if column in ("case", "sequences") else "right")
    for row in done:
        ml = row["volumes_ml"]
        table.add_row(row["case_id"], f"{ml['WT']:.1f}", f"{ml['TC']:.1f}", f"{ml['ET']:.1f}",
                      ", ".join(row["sequences_used"]), f"{row['seconds']:.1f}")
    return table


def skip_transformers() -> None:
    """Keep MONAI from importing Hugging Face transformers in this process.

    ``import monai`` imports all its networks, TransCheX's BERT among them, whenever
    transformers is installed (the ``food`` extra): 2-3 s more at the start of every command
    that touches MONAI, even one that only reports a bad file. No brats-cggm command uses
    transformers; MONAI treats the blocked import as the package being absent. Only the
    console script calls this (its own process): in-process callers keep transformers."""
    sys.modules.setdefault("transformers", None)


def join_size_values(argv: list[str]) -> list[str]:
    """``--size 96 128 80`` → ``--size 96x128x80`` (a Typer option takes one value)."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--size":
            values = []
            while i + 1 < len(argv) and argv[i + 1].isdigit():
                values.append(argv[i + 1])
                i += 1
            if values:
                out.append("x".join(values))
        i += 1
    return out


def main() -> None:
    # Before torch starts OpenMP: idle threads sleep instead of spinning. On a busy 2-core
    # machine (load 5) spinning threads made training steps take 1.1-22 s instead of
    # 0.8-1.2 s (bench/training_speed.py with and without OMP_WAIT_POLICY=PASSIVE).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    skip_transformers()
    sys.argv[1:] = join_size_values(sys.argv[1:])
    try:
        run_app(app)
    except ModuleNotFoundError as error:
        message = missing_extra(error)
        if message is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
