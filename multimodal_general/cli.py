"""``multimodal-general``: the modality-agnostic side of the project."""

from __future__ import annotations

from rich.console import Console
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


def main() -> None:
    run_app(app)
