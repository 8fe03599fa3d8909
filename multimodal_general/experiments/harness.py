"""One protocol for every comparison: each method x seed on the same data and budget, each run
selected on validation, scored once on test, resumable, settings pinned, one table.

An *adapter* says how to run one method with one seed (:data:`RunOne`) and which values to
report (:class:`Column`); the harness does the rest, the same way for every task:

* **Order.** Seed-major, the method order rotated per seed, so no method always pays the first
  run's warm-up and wall times compare like with like (:func:`run_order`).
* **Resume.** ``reuse(method, seed)`` returns the result of a run finished before (read back,
  not trained again) or None; the harness counts which runs were computed and which reused.
* **Not applicable.** A :class:`ConfigurationError` from a method's first run (it cannot serve
  the task, e.g. OGM-GE on a regression task) makes it a "not applicable" row; from a later
  seed it is a real error and propagates.
* **Settings pinned.** Each adapter records the settings its runs were made with
  (:func:`~multimodal_general.io.pin_settings` for a folder, or a run's own file); a rerun
  with other settings is refused instead of mixing budgets in one table.
* **One table.** Per method the mean ± sample std over seeds of every column (finite values
  only, :func:`~multimodal_general.runs.series.mean_std`), written as ``results.md``,
  ``results.csv`` (``<column>_mean`` / ``<column>_std``) and the adapter's ``results.png``.

* **Paired.** An adapter that keeps per-case (per-item) values compares each method with a
  reference case by case: :func:`~multimodal_general.experiments.paired.paired_difference`
  (mean difference, bootstrap 95 % interval), as ``brats_cggm.compare`` does.

The adapters: :mod:`~multimodal_general.experiments.imbalance_comparison` (the synthetic
imbalance task), :mod:`~multimodal_general.experiments.task_comparison` (Food-101, CMU-MOSI,
IEMOCAP), ``brats_cggm.compare`` (BraTS) and ``bench/imbalance.py`` (CGGM's telemetry).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multimodal_general.errors import ConfigurationError
from multimodal_general.io import atomic_write_text
from multimodal_general.runs.series import mean_std, plus_minus

__all__ = ["Column", "Sweep", "errorbar_panels", "markdown_table", "method_cells", "parse_methods",
           "results_csv", "rotated", "run_order", "summarize", "sweep", "write_results"]

#: ``run(method, seed, tick)`` -> the run's result; it calls ``tick()`` after every epoch it trains
RunOne = Callable[[str, int, Callable[[], None]], dict]
#: ``reuse(method, seed)`` -> the result of a run finished before, or None
Reuse = Callable[[str, int], dict | None]


@dataclass(frozen=True)
class Column:
    """One reported value: ``value(result)`` of every run, as mean ± std over seeds."""

    key: str
    title: str
    value: Callable[[dict], float]
    digits: int = 3

    def cell(self, row: Mapping) -> str:
        """``mean ± std`` of the column in a table row (``—`` without a finite mean)."""
        return plus_minus(row[self.key], self.digits)

    def mean_cell(self, row: Mapping) -> str:
        """The mean alone (``—`` when it is not finite), for a value whose spread says little."""
        mean = row[self.key][0]
        return f"{mean:.{self.digits}f}" if math.isfinite(mean) else "—"


@dataclass
class Sweep:
    """What :func:`sweep` did: each method's results (in seed order), the methods that are not
    applicable with their reasons, which (method, seed) pairs were computed or reused, and the
    table the adapter made of them."""

    methods: list[str]
    results: dict[str, list[dict]]
    not_applicable: dict[str, str] = field(default_factory=dict)
    computed: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  #: the adapter's table, one row per method


def parse_methods(methods: str | Sequence[str], choices: Sequence[str], everything: Sequence[str] | None = None) -> list[str]:
    """Method names from ``"a,b"`` or a list, each one of ``choices``; ``"all"`` is ``everything``
    (default: every choice). An unknown, repeated or missing name is a one-line
    :class:`ConfigurationError`."""
    if methods == "all":
        return list(everything if everything is not None else choices)
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise ConfigurationError(f"no method given; choose from {', '.join(choices)} or all")
    unknown = [n for n in names if n not in choices]
    if unknown:
        named = f"method {unknown[0]!r}" if len(unknown) == 1 else f"methods {unknown}"
        raise ConfigurationError(f"unknown {named}; choose from {', '.join(choices)} or all")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigurationError(f"methods repeated: {repeated}")
    return names


def rotated(methods: Sequence[str], seed: int) -> list[str]:
    """The method order of seed ``seed``: rotated by one per seed."""
    names = list(methods)
    shift = seed % len(names)
    return names[shift:] + names[:shift]


def run_order(methods: Sequence[str], seeds: int) -> Iterator[tuple[int, str]]:
    """``(seed, method)`` seed-major, the method order :func:`rotated` per seed."""
    for seed in range(seeds):
        for name in rotated(methods, seed):
            yield seed, name


def sweep(methods: Sequence[str], seeds: int, run: RunOne, epochs: int = 0,
          progress: Callable[[str, int], None] | None = None, reuse: Reuse | None = None) -> Sweep:
    """Every method x seed through ``run`` (or ``reuse``), in :func:`run_order`.

    ``progress(label, epochs_done)`` is called after every epoch, and with a whole run's
    ``epochs`` when a run is reused or its method is not applicable (for a progress bar of
    ``len(methods) * seeds * epochs`` epochs).
    """
    if seeds < 1:
        raise ConfigurationError("--seeds must be at least 1")
    report = progress or (lambda label, n: None)
    done = Sweep(list(methods), {name: [] for name in methods})
    for seed, name in run_order(methods, seeds):
        label = f"{name} seed {seed}"
        if name in done.not_applicable:
            report(f"{label} (not applicable)", epochs)
            continue
        saved = reuse(name, seed) if reuse is not None else None  # its errors are not "not applicable"
        if saved is not None:
            done.results[name].append(saved)
            done.skipped.append((name, seed))
            report(f"{label} (done before)", epochs)
            continue
        ticks = [0]

        def tick(label=label):
            ticks[0] += 1
            report(label, 1)

        try:
            result = run(name, seed, tick)
        except ConfigurationError as error:
            if done.results[name]:
                raise
            done.not_applicable[name] = str(error).strip().splitlines()[0]
            report(f"{name} (not applicable)", epochs - ticks[0])
            continue
        done.results[name].append(result)
        done.computed.append((name, seed))
        if ticks[0] < epochs:  # a run resumed part-way, or one that stopped early
            report(label, epochs - ticks[0])
    return done


def summarize(done: Sweep, columns: Sequence[Column], **fields: Callable[[str, list[dict]], object]) -> list[dict]:
    """One row per method: ``method``, ``status`` (``ok`` / ``not applicable``), ``reason``,
    ``runs`` and ``(mean, std)`` of every column; ``fields`` add per-method values computed from
    the method's name and runs (e.g. how many diverged)."""
    rows = []
    for name in done.methods:
        reason = done.not_applicable.get(name)
        runs = [] if reason is not None else done.results[name]
        row: dict = {"method": name, "status": "ok" if reason is None else "not applicable",
                     "reason": reason or "", "runs": len(runs)}
        row.update({key: make(name, runs) for key, make in fields.items()})
        row.update({column.key: mean_std([column.value(r) for r in runs]) for column in columns})
        rows.append(row)
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (a ``|`` in the header or a cell is escaped)."""
    def line(cells: Sequence) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)]) + "\n"


def method_cells(row: Mapping, cells: Sequence[str], width: int) -> list[str]:
    """A method's cells, or its "not applicable" row padded to ``width``."""
    if row["status"] != "ok":
        return [row["method"], f"not applicable: {row['reason']}"] + [""] * (width - 2)
    return [row["method"], *cells]


def results_csv(rows: Sequence[Mapping]) -> str:
    """A row per method; a ``(mean, std)`` value becomes ``<key>_mean`` and ``<key>_std``,
    a non-finite number an empty cell."""
    flat = []
    for row in rows:
        item = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                item[f"{key}_mean"], item[f"{key}_std"] = (_cell(v) for v in value)
            else:
                item[key] = _cell(value)
        flat.append(item)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in flat for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _cell(value):
    return "" if isinstance(value, float) and not math.isfinite(value) else value


def write_results(out: Path, markdown: str, rows: Sequence[Mapping], plot: Callable[[Path], None] | None = None) -> None:
    """``results.md``, ``results.csv`` and (with ``plot``) ``results.png`` in ``out``, each atomically."""
    atomic_write_text(out / "results.md", markdown)
    atomic_write_text(out / "results.csv", results_csv(rows))
    if plot is not None:
        plot(out / "results.png")


def errorbar_panels(path: Path, rows: Sequence[Mapping], panels: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> None:
    """One panel per ``(title, [(label, column key), ...])``: the mean ± std of each column per
    method as points with error bars (not bars from 0, so the axis zooms onto the differences),
    several columns of a panel side by side; a method that is not applicable is marked n/a."""
    from matplotlib.figure import Figure

    from multimodal_general.runs.plots import save_figure

    fig = Figure(figsize=(max(8, 1.5 * len(rows) + 4), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels):
        for j, (label, key) in enumerate(series):
            offset = 0.3 * (j - (len(series) - 1) / 2) / max(len(series), 1)
            shown = [i for i, r in enumerate(rows) if r["status"] == "ok" and math.isfinite(r[key][0])]
            ax.errorbar([i + offset for i in shown], [rows[i][key][0] for i in shown],
                        yerr=[rows[i][key][1] for i in shown], fmt="o", capsize=3, label=label)
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                ax.annotate("n/a", (i, 0.5), xycoords=("data", "axes fraction"), ha="center")
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right")
        ax.grid(alpha=0.3)
    save_figure(fig, path)
