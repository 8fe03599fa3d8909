"""``multimodal-general``: the modality-agnostic side of the project."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from multimodal_general.balance import BALANCERS, METRICS, PRESETS
from multimodal_general.cli_support import make_app, run_app

app = make_app("Balanced multimodal learning (CGGM and baselines) for general tasks.")
console = Console()


@app.command()
def balancers() -> None:
    """List the balancers, CGGM's presets and the utilization metrics."""
    table = Table(title="Balancers")
    table.add_column("name")
    table.add_column("description")
    for name, cls in BALANCERS.items():
        table.add_row(name, (cls.__doc__ or "").strip().splitlines()[0])
    console.print(table)
    presets = Table(title="CGGM presets (--preset)")
    presets.add_column("preset")
    presets.add_column("cosine of")
    presets.add_column("L_gm lag")
    presets.add_column("guarded B")
    presets.add_column("summary")
    for preset in PRESETS.values():
        presets.add_row(
            preset.name, preset.cosine_of, "1 step" if preset.lagged_direction else "none",
            "yes" if preset.guarded else "no", preset.summary,
        )
    console.print(presets)
    console.print("Utilization metrics: " + ", ".join(METRICS))


@app.command()
def compare(
    task: str = typer.Option("cls2", help="synthetic imbalance task: cls2, cls3 or reg2"),
    methods: str = typer.Option(
        "none,cggm,ogm_ge,mmpareto,agm,mslr,modality_dropout,gblending",
        help="comma-separated balancer names, or cggm-<preset> (paper, official, stable)",
    ),
    seeds: int = typer.Option(3, help="seeds 0..n-1"),
    epochs: int = typer.Option(20, help="epochs per run (the same for every method)"),
    out: Path = typer.Option(Path("compare_results"), help="output folder (runs/ resume from it)"),
    train_size: int = typer.Option(4000, help="training samples"),
    val_size: int = typer.Option(4000, help="validation samples (model selection)"),
    test_size: int = typer.Option(None, help="test samples (default: val-size)"),
    lr: float = typer.Option(0.05, help="SGD learning rate"),
    fusion_head: str = typer.Option("auto", help="fused head: auto (linear for ogm_ge, else mlp), mlp or linear"),
    threads: int = typer.Option(1, help="torch intra-op threads"),
) -> None:
    """Run every method x seed with the same budget; select on validation, report on test."""
    import torch

    from multimodal_general.compare import compare as run_compare
    from multimodal_general.compare import parse_methods
    from multimodal_general.errors import ConfigurationError
    from multimodal_general.tasks.imbalance import TASKS

    if task not in TASKS:
        raise ConfigurationError(f"unknown task {task!r}; choose from {list(TASKS)}")
    names = parse_methods(methods)  # unknown names: one-line error before anything runs
    if threads < 1:
        raise ConfigurationError("--threads must be >= 1")
    torch.set_num_threads(threads)
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        job = bar.add_task("starting", total=len(names) * seeds * max(epochs, 1))
        outcome = run_compare(
            task, names, seeds, out, epochs, train_size=train_size, val_size=val_size,
            test_size=test_size, lr=lr, fusion_head=fusion_head,
            progress=lambda label, n: bar.update(job, advance=n, description=label),
        )
    console.print((out / "results.md").read_text(), markup=False, highlight=False)
    console.print(
        f"{len(outcome.computed)} run(s) computed, {len(outcome.skipped)} resumed from {out / 'runs'}; "
        f"wrote {out / 'results.md'}, results.csv, results.png"
    )


def main() -> None:
    run_app(app)
