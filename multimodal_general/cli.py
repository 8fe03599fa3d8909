"""``multimodal-general``: the modality-agnostic side of the project."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from multimodal_general.balance import BALANCERS, CGGM_PRESETS, METRICS, BalancerSpec
from multimodal_general.cli_support import (
    OWN_OPTIONS,
    make_app,
    parse_balancer_options,
    progress_bar,
    renamed,
    run_app,
)
from multimodal_general.errors import ConfigurationError
from multimodal_general.resume import check_resume

app = make_app("Balanced multimodal learning (CGGM and baselines) for general tasks.")
console = Console()
TASK_HELP = "food101, mosi or iemocap"


@dataclass(frozen=True)
class ModelOptions:
    """The options of a data task's model and its training that ``train`` and ``compare``
    share (the defaults of both); the rest of a run's settings come from each command."""

    batch_size: int = 32
    optimizer: str = "adamw"
    d_model: int = 64
    layers: int = 2
    fusion_head: str = "auto"
    fold: int = 1
    max_steps: int = 0
    bert: Path | None = None
    vit: Path | None = None

    def settings(self, task: str, data: Path, **more):
        """The run's checked TrainSettings (paths absolute: a run resumes from anywhere)."""
        from multimodal_general.training.runner import TrainSettings

        paths = {name: str(path.resolve()) if path else "" for name, path in (("bert", self.bert), ("vit", self.vit))}
        return TrainSettings(task=task, data=str(data.expanduser().resolve()),
                             **{**asdict(self), **paths, **more}).check()


class Shared(NamedTuple):
    """An option that ``train`` and ``compare`` share, declared once: its type and help in
    each (compare's help says which tasks use it)."""

    train: Any
    compare: Any


def shared(kind: Any, help_text: str, used_by: str | None = "data tasks") -> Shared:
    """An option of type ``kind``; its help is ``help_text``, prefixed with the tasks that use
    it (``used_by``; None: every task) where they are not all the command's tasks (train's
    tasks are the data tasks; compare's also the synthetic ones)."""
    scoped = help_text if used_by is None else f"{used_by}: {help_text}"
    return Shared(Annotated[kind, typer.Option(help=help_text if used_by in (None, "data tasks") else scoped)],
                  Annotated[kind, typer.Option(help=scoped)])


BatchSize = shared(int, "batch size")
Optimizer = shared(str, "adamw or sgd (momentum 0.9)")
DModel = shared(int, "width of each modality's transformer encoder")
Layers = shared(int, "transformer layers per modality")
FusionHead = shared(str, "fused head: auto (linear for ogm_ge, else mlp), mlp or linear", None)
Fold = shared(int, "cross-validation fold 1..10", "IEMOCAP")
MaxSteps = shared(int, "cut every sequence to this many steps (0: keep all)")
Bert = shared(Path, "local BERT folder (features are extracted once, then cached)", "Food-101")
Vit = shared(Path, "local ViT folder", "Food-101")


@app.command()
def balancers() -> None:
    """List the balancers, CGGM's presets and the utilization metrics."""
    table = Table(title="Balancers")
    table.add_column("name")
    table.add_column("description")
    for name, cls in BALANCERS.items():
        table.add_row(name, (cls.__doc__ or "").strip().splitlines()[0])
    console.print(table)
    presets = Table(title="CGGM presets (train --cggm-preset; compare --methods cggm-<preset>)")
    presets.add_column("preset")
    presets.add_column("cosine of")
    presets.add_column("L_gm lag")
    presets.add_column("guarded B")
    presets.add_column("summary")
    for preset in CGGM_PRESETS.values():
        presets.add_row(
            preset.name, preset.cosine_of, "1 step" if preset.lagged_direction else "none",
            "yes" if preset.guarded else "no", preset.summary,
        )
    console.print(presets)
    console.print("Utilization metrics: " + ", ".join(METRICS))


@app.command()
def compare(
    task: str = typer.Option("cls2", help="synthetic imbalance task cls2, cls3 or reg2, or a data task: " + TASK_HELP),
    methods: str = typer.Option(
        "none,cggm,ogm_ge,mmpareto,agm,mslr,modality_dropout,gblending",
        help="comma-separated balancer names, or cggm-<preset> (paper, official, stable)",
    ),
    seeds: int = typer.Option(3, help="seeds 0..n-1"),
    epochs: int = typer.Option(20, help="epochs per run (the same for every method)"),
    out: Path = typer.Option(Path("compare_results"), help="output folder (runs/ resume from it)"),
    data: Path = typer.Option(None, help="data tasks: the dataset (MOSI pickle, IEMOCAP root, Food-101 root)"),
    train_size: int = typer.Option(4000, help="synthetic tasks: training samples"),
    val_size: int = typer.Option(4000, help="synthetic tasks: validation samples (model selection)"),
    test_size: int = typer.Option(None, help="synthetic tasks: test samples (default: val-size)"),
    lr: float = typer.Option(None, help="learning rate (default: 0.05 SGD for synthetic tasks, 1e-3 AdamW for data tasks)"),
    fusion_head: FusionHead.compare = ModelOptions.fusion_head,
    batch_size: BatchSize.compare = ModelOptions.batch_size,
    optimizer: Optimizer.compare = ModelOptions.optimizer,
    d_model: DModel.compare = ModelOptions.d_model,
    layers: Layers.compare = ModelOptions.layers,
    fold: Fold.compare = ModelOptions.fold,
    max_steps: MaxSteps.compare = ModelOptions.max_steps,
    bert: Bert.compare = None,
    vit: Vit.compare = None,
    threads: int = typer.Option(1, help="torch intra-op threads"),
    balancer_option: list[str] = typer.Option(
        None, "--balancer-option",
        help="a balancer hyperparameter, e.g. alpha=0.5 (repeatable; each method takes the ones it declares)"),
) -> None:
    """Run every method x seed with the same budget; select on validation, report on test."""
    from multimodal_general.balance import check_balancer_options
    from multimodal_general.training.runner import TASKS as DATA_TASKS

    options = parse_balancer_options(balancer_option)
    check_balancer_options(options)
    if task in DATA_TASKS:
        model = ModelOptions(batch_size, optimizer, d_model, layers, fusion_head, fold, max_steps, bert, vit)
        _compare_on_data(task, data, model, methods, seeds, epochs, out, lr, threads, options)
        return
    lr = 0.05 if lr is None else lr
    import torch

    from multimodal_general.errors import ConfigurationError
    from multimodal_general.experiments.imbalance_comparison import compare as run_compare
    from multimodal_general.experiments.imbalance_comparison import parse_methods
    from multimodal_general.training.imbalance import TASKS

    if task not in TASKS:
        raise ConfigurationError(f"unknown task {task!r}; choose from {list(TASKS)}")
    names = parse_methods(methods)  # unknown names: one-line error before anything runs
    if threads < 1:
        raise ConfigurationError("--threads must be >= 1")
    torch.set_num_threads(threads)
    with _bar() as bar:
        job = bar.add_task("starting", total=len(names) * seeds * max(epochs, 1))
        outcome = run_compare(
            task, names, seeds, out, epochs, train_size=train_size, val_size=val_size,
            test_size=test_size, lr=lr, fusion_head=fusion_head, balancer_options=options,
            progress=lambda label, n: bar.update(job, advance=n, description=label),
        )
    console.print((out / "results.md").read_text(), markup=False, highlight=False)
    console.print(
        f"{len(outcome.computed)} run(s) computed, {len(outcome.skipped)} resumed from {out / 'runs'}; "
        f"wrote {out / 'results.md'}, results.csv, results.png"
    )


def _compare_on_data(task: str, data: Path | None, model: ModelOptions, methods: str, seeds: int, epochs: int,
                     out: Path, lr: float | None, threads: int, options: dict) -> None:
    import torch

    from multimodal_general.experiments.imbalance_comparison import parse_methods
    from multimodal_general.experiments.task_comparison import compare_on_task

    if data is None:
        raise ConfigurationError(f"--task {task} needs --data")
    names = parse_methods(methods)
    torch.set_num_threads(max(1, threads))
    settings = model.settings(task, data, epochs=epochs, lr=1e-3 if lr is None else lr,
                              balancer=BalancerSpec(options=options))
    loaded = _load(settings)
    with _bar() as bar:
        job = bar.add_task("starting", total=len(names) * seeds * epochs)
        compare_on_task(settings, loaded, names, seeds, out,
                        progress=lambda label, epochs: bar.update(job, advance=epochs, description=label))
    console.print((out / "results.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out / 'results.md'}, results.csv, results.png; runs in {out / 'runs'}")


# ------------------------------------------------------------------ the general tasks
def _bar():
    return progress_bar(console)


def _load(settings, what: str = "reading data"):
    from multimodal_general.training.runner import load_task

    with _bar() as bar:
        job = bar.add_task(what, total=None)

        def progress(done, total):
            bar.update(job, completed=done, total=total, description="extracting Food-101 features")

        return load_task(settings, progress=progress)


@app.command()
def train(
    ctx: typer.Context,
    task: str = typer.Option(..., help=TASK_HELP),
    data: Path = typer.Option(..., help="the dataset: MOSI pickle, IEMOCAP feature root or Food-101 root"),
    out: Path = typer.Option(..., help="the run folder (config, seed-<k>/ with metrics, telemetry, checkpoints, plots)"),
    balancer: str = typer.Option("none", help="none, cggm or a baseline (see `balancers`)"),
    cggm_preset: str = typer.Option(None, help="CGGM variant: stable, paper or official [default: stable]"),
    preset: str = typer.Option(None, hidden=True, help="the former name of --cggm-preset"),
    epochs: int = typer.Option(None, help="epochs per seed [default: 20; with --resume: the run's, or more to extend it]"),
    seeds: int = typer.Option(1, help="train seeds 0..n-1 and report mean ± std"),
    lr: float = typer.Option(1e-3, help="learning rate (model and heads)"),
    batch_size: BatchSize.train = ModelOptions.batch_size,
    optimizer: Optimizer.train = ModelOptions.optimizer,
    weight_decay: float = typer.Option(1e-4, help="weight decay"),
    rho: float = typer.Option(1.2, help="CGGM's rho (how strongly the modalities are rebalanced)"),
    lam: float = typer.Option(0.1, help="CGGM's lambda (weight of the direction loss)"),
    d_model: DModel.train = ModelOptions.d_model,
    layers: Layers.train = ModelOptions.layers,
    heads: int = typer.Option(4, help="attention heads"),
    dropout: float = typer.Option(0.1, help="dropout"),
    fusion_head: FusionHead.train = ModelOptions.fusion_head,
    fold: Fold.train = ModelOptions.fold,
    max_steps: MaxSteps.train = ModelOptions.max_steps,
    bert: Bert.train = None,
    vit: Vit.train = None,
    device: str = typer.Option("cpu", help="auto (cuda when available), cpu or cuda"),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)"),
    resume: bool = typer.Option(False, help="continue the run in --out (finished seeds are kept)"),
    balancer_option: list[str] = typer.Option(
        None, "--balancer-option",
        help="a baseline's hyperparameter, e.g. alpha=0.5 (repeatable; each method takes the ones it declares)"),
) -> None:
    """Train a task model with a balancer; select each seed on validation, report on test.

    The command that started a run, with `--resume` appended, continues it; only `--epochs`
    may change."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    if seeds < 1:
        raise ConfigurationError("--seeds must be >= 1")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = renamed(cggm_preset, preset, "--cggm-preset", "--preset") or "stable"
    spec = BalancerSpec(balancer, preset, rho, lam, options=parse_balancer_options(balancer_option, OWN_OPTIONS))
    model = ModelOptions(batch_size, optimizer, d_model, layers, fusion_head, fold, max_steps, bert, vit)
    settings = model.settings(task, data, balancer=spec, epochs=epochs or 20, lr=lr, weight_decay=weight_decay,
                              heads=heads, dropout=dropout, device=device)
    seed_list = list(range(seeds))
    if resume:
        settings, seed_list = _resumed(ctx, settings, out, epochs)
    _train_seeds(settings, seed_list, out, resume)


#: train's parameters whose key in the run's settings (TrainSettings.to_dict) has another name
FIELDS = {"balancer_option": "balancer_options", "cggm_preset": "preset"}


def _resumed(ctx: typer.Context, settings, out: Path, epochs: int | None):
    """The settings and seeds of the run in ``out``, with ``--epochs`` when given; an option
    given on the command line with another value than the run's is an error (:func:`check_resume`)."""
    from multimodal_general.experiments.seeds import read_settings

    saved, seeds = read_settings(out)
    check_resume(_given_changes(ctx, settings, saved, len(seeds)), "--epochs", out)
    return replace(saved, epochs=epochs or saved.epochs), seeds


def _given_changes(ctx: typer.Context, settings, saved, saved_seeds: int) -> dict[str, tuple]:
    """``{--NAME: (the run's value, this command's)}`` for each option given on the command
    line whose value differs from the run's own."""
    changed = {}
    for name in ctx.params:
        source = ctx.get_parameter_source(name)  # by name: typer may bring its own copy of click's enum
        if getattr(source, "name", None) != "COMMANDLINE" or name in ("out", "resume", "threads"):
            continue
        field = FIELDS.get(name, name)
        if name == "seeds":
            old, new = saved_seeds, ctx.params[name]
        else:
            old, new = saved.to_dict()[field], settings.to_dict()[field]
        if old != new:
            changed[f"--{name.replace('_', '-')}"] = (old, new)
    return changed


def _train_seeds(settings, seeds: list[int], out: Path, resume: bool) -> None:
    """Train (or continue) the run's seeds in ``out`` under a progress bar, then show its summary."""
    from multimodal_general.experiments.seeds import train_run

    data = _load(settings)
    console.print(f"{settings.task}: " + ", ".join(f"{n} {len(s)}" for n, s in data.splits.items())
                  + f"; modalities {dict(data.input_dims)}; run folder {out}")
    batches = sum(1 for _ in range(0, len(data.splits["train"]), settings.batch_size))
    with _bar() as bar:
        job = bar.add_task("starting", total=len(seeds) * settings.epochs * batches)
        current = {"seed": 0}

        def on_seed(seed):
            current["seed"] = seed
            bar.update(job, completed=seeds_done(seed), description=f"seed {seed}")

        def seeds_done(seed):
            return seed * settings.epochs * batches

        def on_epoch(epoch, row):
            bar.update(job, completed=seeds_done(current["seed"]) + epoch * batches,
                       description=f"seed {current['seed']} epoch {epoch}/{settings.epochs}")

        train_run(settings, data, seeds, out, resume=resume, on_seed=on_seed,
                  on_epoch=on_epoch, on_batch=lambda: bar.advance(job))
        bar.update(job, completed=len(seeds) * settings.epochs * batches)
    console.print(Markdown((out / "summary.md").read_text()))
    console.print(f"wrote {out / 'summary.json'}; per seed: metrics, telemetry, checkpoints and plots in {out}/seed-<k>/")


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="a run folder made by `multimodal-general train`"),
    split: str = typer.Option("test", help="train, val (validation) or test"),
    checkpoint: str = typer.Option("best", help="best (validation-selected) or last"),
    data: Path = typer.Option(None, help="the dataset, when it moved since training"),
) -> None:
    """Score every seed's checkpoint of a run on a split with the task's metrics."""
    from multimodal_general.datasets.metrics import TASK_METRICS
    from multimodal_general.experiments.seeds import evaluate_run, read_settings

    split = {"val": "valid"}.get(split, split)  # brats-cggm's name for it; valid, the datasets', too
    settings, _ = read_settings(run)
    if data is not None:
        settings = replace(settings, data=str(data.expanduser().resolve()))
    result = evaluate_run(run, _load(settings), split, checkpoint, settings=settings)
    metrics = TASK_METRICS[settings.task]
    table = Table(title=f"{settings.task}: {split} ({checkpoint} checkpoint), mean ± std over {len(result['runs'])} seed(s)")
    table.add_column("model")
    for m in metrics:
        table.add_column(m)
    summary = result["summary"]
    rows = [("fused", summary["fused"])] + [(f"head: {m}", v) for m, v in summary["heads"].items()]
    for name, values in rows:
        table.add_row(name, *(f"{values[m][0]:.3f} ± {values[m][1]:.3f}" for m in metrics))
    console.print(table)
    console.print(f"wrote {run / f'evaluation-{split}-{checkpoint}.json'}")


@app.command()
def synth(
    task: str = typer.Option(..., help=TASK_HELP),
    out: Path = typer.Option(..., help="where to write the dataset (MOSI: a .pkl file; else a new folder)"),
    imbalance: float = typer.Option(4.0, help="signal-to-noise of the dominant modality / of the others"),
    dominant: str = typer.Option("text", help="the dominant modality"),
    strength: float = typer.Option(2.0, help="signal-to-noise of the dominant modality"),
    samples: int = typer.Option(0, help="training samples (0: the writer's default); valid/test get a third each"),
    unaligned: bool = typer.Option(False, help="MOSI: the unaligned layout (50/375/500 steps)"),
    random_encoders: bool = typer.Option(
        False, help="Food-101: also write a tiny RANDOMLY initialised BERT and ViT (not pretrained) to OUT/random_encoders"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Write a synthetic dataset in the task's official format, with a controllable imbalance."""
    from multimodal_general.training.runner import TASKS

    if task not in TASKS:
        raise ConfigurationError(f"unknown task {task!r}; choose from {list(TASKS)}")
    if out.exists():
        raise ConfigurationError(f"{out} exists; choose a new path")
    common = {"imbalance": imbalance, "dominant": dominant, "strength": strength, "seed": seed}
    if task == "mosi":
        from multimodal_general.datasets.mosi import write_synthetic_mosi

        sizes = {"sizes": (samples, max(1, samples // 3), max(1, samples // 3))} if samples else {}
        written = write_synthetic_mosi(out, aligned=not unaligned, **sizes, **common)
    elif task == "iemocap":
        from multimodal_general.datasets.iemocap import write_synthetic_iemocap

        written = write_synthetic_iemocap(out, **({"utterances": samples} if samples else {}), **common)
    else:
        from multimodal_general.datasets.food101 import (
            write_random_encoders,
            write_synthetic_food101,
        )

        per_class = {}
        if samples:
            per = max(1, samples // 8)
            per_class = {"per_class": (per, max(1, per // 3), max(1, per // 3))}
        written = write_synthetic_food101(out, **per_class, **common)
        if random_encoders:
            bert, vit = write_random_encoders(out / "random_encoders")
            console.print(f"random (NOT pretrained) encoders: --bert {bert} --vit {vit}")
    console.print(f"wrote {written}")


def main() -> None:
    run_app(app)
