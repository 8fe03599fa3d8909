"""The comparison harness of the segmentation side (``brats-cggm compare``): every method x
seed trained by the BraTS trainer with the same budget, each run selected on its validation
cases, scored once on test cases it never saw.

    brats-cggm compare --data data/phantoms --test-data data/test_phantoms \\
        --methods none,cggm,mmpareto,agm,mslr,gblending,modality_dropout,early_fusion --seeds 3 --out runs/cmp

* **Same budget.** One configuration (``--preset``, ``--epochs``, ``--set``) for every run; a
  method changes only what makes it that method (:data:`METHODS`); the seed changes
  initialisation, patches and augmentation, never the train/validation split.
* **Selection** on the run's validation cases (best mean Dice, ``checkpoints/best.pt``), or
  none with ``--checkpoint last``: a fixed budget, the last epoch's checkpoint is scored.
* **Test**: every case of ``--test-data`` (``brats-cggm evaluate --split all``), or, without
  it, the cases of ``--data`` that the split leaves out of training and validation
  (``--split test``).
* **Resume.** ``OUT/runs/<method>-seed<k>/`` is an ordinary run folder: a finished run
  (``summary.json``) and its evaluation are reused, an unfinished one continues from
  ``last.pt``. ``OUT/settings.yaml`` pins the shared settings: a rerun with others is refused.
* **Report.** ``OUT/results.md|csv|json`` and ``results.png``: test Dice per region and its
  mean (mean ± std over seeds), the validation mean Dice of the scored epochs, each
  sequence's auxiliary head alone on the validation cases at the end, and time per step and
  per run.
* **Paired.** Every method but the reference (``--reference``, default: the first) compared
  to it case by case: per metric of the per-case rows (Dice and HD95 per region, ...), the
  mean difference with its bootstrap 95 % interval (:mod:`multimodal_general.experiments.paired`),
  a case's value first averaged over seeds. Each run's row with its per-case rows is kept in
  ``OUT/scores/<method>-seed<k>.json`` (small: commit it beside the table).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from brats_cggm import MODALITIES
from brats_cggm.data.layouts import discover
from brats_cggm.errors import BadInputFile, ConfigurationError
from brats_cggm.metrics import REGIONS
from brats_cggm.training.cases import select_cases
from brats_cggm.training.config import DataConfig
from multimodal_general.balance import CGGM_METHODS, BalancerSpec
from multimodal_general.experiments import harness
from multimodal_general.experiments.harness import Column, Sweep, markdown_table, summarize, sweep, write_results
from multimodal_general.experiments.paired import RESAMPLES, case_means, interval_cell, paired_difference
from multimodal_general.io import atomic_write, atomic_write_text, json_safe, pin_settings
from multimodal_general.runs.provenance import provenance
from multimodal_general.runs.series import mean_std, plus_minus

#: what each method changes in the shared configuration
METHODS: dict[str, dict[str, Any]] = {
    "none": {"balancer.name": "none"},
    "cggm": {"balancer.name": "cggm", "balancer.preset": "stable"},
    "mmpareto": {"balancer.name": "mmpareto"},
    "agm": {"balancer.name": "agm"},
    "mslr": {"balancer.name": "mslr"},
    "gblending": {"balancer.name": "gblending"},
    "modality_dropout": {"balancer.name": "none", "network.sequence_dropout": 0.25},
    # one 4-channel U-Net at the widths of the multi-branch network (see early_fusion_overrides)
    "early_fusion": {"balancer.name": "none", "network.preset": "early_fusion"},
    "early_fusion_dropout": {"balancer.name": "none", "network.preset": "early_fusion", "network.sequence_dropout": 0.25},
}


#: CGGM with a named preset (``cggm`` is ``cggm-stable``), the names ``multimodal-general compare`` uses
CGGM_VARIANTS = {method: {"balancer.name": spec.name, "balancer.preset": spec.preset}
                 for method in CGGM_METHODS for spec in [BalancerSpec.parse(method)]}


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"none,cggm"``, a list of names or ``"all"`` (every method of :data:`METHODS`), checked."""
    return harness.parse_methods(methods, [*METHODS, *CGGM_VARIANTS], list(METHODS))


def method_overrides(method: str, shared: dict[str, Any], preset: str) -> dict[str, Any]:
    """The configuration overrides of one method's run: the shared ones, then the method's."""
    own = {**METHODS, **CGGM_VARIANTS}[method]
    overrides = {**shared, **own}
    if own.get("network.preset") == "early_fusion":
        overrides["network.fusion"] = "mean"  # one U-Net over stacked sequences: no branches to fuse
        overrides["network.overrides"] = early_fusion_overrides(preset, shared)
    return overrides


def early_fusion_overrides(preset: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The early-fusion U-Net at the widths of the multi-branch network the others train."""
    from brats_cggm.network import NETWORK_PRESETS
    from brats_cggm.training import resolve_config

    network = resolve_config(preset, None, shared).network
    options = {**NETWORK_PRESETS[network.preset].options, **network.overrides}
    # MONAI's UNet strides every level but the first; the multi-branch stem's stride is its first
    return {"channels": list(options["channels"]), "strides": list(options["strides"])[1:],
            "num_res_units": options["num_res_units"]}


def compare(
    data: Path,
    methods: str | Sequence[str],
    seeds: int,
    out: Path,
    *,
    test_data: Path | None = None,
    preset: str = "cpu-small",
    settings: dict[str, Any] | None = None,
    report: Callable[[str], None] = print,
    progress=None,
    subsets: bool = False,
    checkpoint: str = "best",
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse) and evaluate every method x seed; write and return the per-run rows
    (each with its per-case rows, also in ``OUT/scores/<method>-seed<k>.json``). With ``subsets``
    the test cases are also scored with each of the 15 non-empty subsets of the sequences
    (``brats-cggm evaluate --subsets``). ``checkpoint``: ``best`` (selected on validation) or
    ``last`` (a fixed budget: no selection). ``reference``: the method every other is compared
    to, case by case (default: the first)."""
    from brats_cggm.training import Trainer, resolve_config, start, stop

    names = parse_methods(methods)
    if seeds < 1:
        raise ConfigurationError("--seeds must be at least 1")
    reference = _check_reference(names, reference, checkpoint)
    out = Path(out)
    shared = {**(settings or {}), "data.dir": str(Path(data).resolve())}
    test_source = str(Path(test_data).resolve()) if test_data is not None else None
    for method in names:  # every configuration and both data folders are checked before anything is written
        resolve_config(preset, None, method_overrides(method, shared, preset))
    _check_cases(resolve_config(preset, None, shared).data, test_data)
    pin_settings(out / "settings.yaml", {"preset": preset, "settings": shared, "test_data": test_source,
                                         **({"checkpoint": checkpoint} if checkpoint != "best" else {})})
    place = start(resolve_config(preset, None, shared).device)

    def run(method: str, seed: int, tick) -> dict:
        run_dir = out / "runs" / f"{method}-seed{seed}"
        if not (run_dir / "summary.json").exists():
            resume = (run_dir / "checkpoints" / "last.pt").exists()
            report(f"{'continuing' if resume else 'training'} {method}, seed {seed} ({run_dir})")
            config = resolve_config(preset, None, {**method_overrides(method, shared, preset), "seed": seed})
            Trainer(config, run_dir, place, resume=resume, report=report, progress=progress).fit()
        scored = score_run(run_dir, method, seed, test_data, place.device.type, report, subsets, checkpoint)
        write_scores(out / "scores" / f"{method}-seed{seed}.json", scored)
        return scored

    try:
        done = sweep(names, seeds, run)
    finally:
        stop()
    runs = sorted((r for name in names for r in done.results[name]), key=lambda r: (r["seed"], names.index(r["method"])))
    command = (f"brats-cggm compare --data {data} {f'--test-data {test_data} ' if test_data else ''}--preset {preset} "
               f"--methods {','.join(names)} --seeds {seeds} --out {out}"
               + (f" --checkpoint {checkpoint}" if checkpoint != "best" else "")
               + (f" --reference {reference}" if reference != names[0] else "")
               + "".join(f" --set {k}={json.dumps(v)}" for k, v in (settings or {}).items()))
    write_comparison(out, runs, names, reference, command, test_data, checkpoint)
    return runs


#: how a run's checkpoint is chosen: selected on validation, or the last one of a fixed budget
CHECKPOINTS = {"best": "selected on its validation cases (best mean Dice)",
               "last": "the last epoch of the fixed budget (no selection)"}


def _check_reference(names: Sequence[str], reference: str | None, checkpoint: str) -> str:
    if checkpoint not in CHECKPOINTS:
        raise ConfigurationError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}; got {checkpoint!r}")
    if reference is not None and reference not in names:
        raise ConfigurationError(f"--reference {reference!r} is not one of the methods ({', '.join(names)})")
    return reference or names[0]


def write_comparison(out: Path, runs: list[dict], names: Sequence[str], reference: str, command: str,
                     test_data: Path | None, checkpoint: str) -> None:
    """``results.md|csv|json|png``: per method the mean ± std over seeds, and (each method but
    the reference) the paired per-case difference to ``reference``."""
    rows = aggregate(runs, names)
    paired = paired_rows(runs, names, reference)
    text = markdown(rows, command, test_data, checkpoint) + "\n" + paired_markdown(paired, reference)
    write_results(out, text, [{**row, **flat_paired(paired.get(row["method"], {}))} for row in rows],
                  lambda path: plot(path, rows))
    if paired:
        plot_paired(out / "paired.png", paired, reference)
    atomic_write_text(out / "results.json", json.dumps(
        json_safe({"command": command, "provenance": provenance("torch", "monai"), "methods": rows,
                   "reference": reference, "paired": paired, "runs": runs}), indent=1, default=str) + "\n")


def write_scores(path: Path, run: dict) -> None:
    """A run's row with its per-case rows: a small file to keep (commit) beside the table."""
    atomic_write_text(path, json.dumps(json_safe(run), indent=1) + "\n")


def _check_cases(data: DataConfig, test_data: Path | None) -> None:
    """A folder without usable cases, or no test cases at all, is named now, not after training."""
    chosen = select_cases(data)
    if test_data is None:
        used = {c.case_id for c in (*chosen.train, *chosen.val)}
        if all(c.case_id in used for c in discover(data.dir, data.layout).cases):
            raise ConfigurationError(
                f"{data.dir}: the split uses every case for training or validation, so none is left to test "
                "on; give --test-data DIR (held-out cases) or a split file that leaves cases out"
            )
        return
    found = discover(test_data)
    problem = found.problems[0] if found.problems else next(
        (BadInputFile(c.images[0].parent, f"case {c.case_id} has no label map; testing needs one")
         for c in found.cases if c.label is None), None)
    if problem is not None:
        raise problem


def score_run(run_dir: Path, method: str, seed: int, test_data: Path | None, device: str,
              report: Callable[[str], None], subsets: bool = False, checkpoint: str = "best") -> dict:
    """One run's row: the scored epoch's validation Dice, the heads at the end, the test Dice
    (with ``subsets``: also the 15-subset average per region and the worst subset) and, in
    ``cases``, every per-case row of the test cases (``case_id`` and each metric)."""
    from brats_cggm.evaluation import evaluate

    split = "all" if test_data is not None else "test"
    evaluated = run_dir / "evaluation" / split / "summary.json"
    if not evaluated.exists() or _stale(json.loads(evaluated.read_text()), subsets, checkpoint):
        report(f"evaluating {run_dir.name} ({checkpoint}.pt) on {split} cases")
        evaluate(run_dir, test_data, split, checkpoint, device, subsets=subsets)
    test = json.loads(evaluated.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    validated = [r for r in rows if "val_dice/mean" in r]
    scored = (next(r for r in rows if r["epoch"] == summary["best_epoch"]) if checkpoint == "best" else validated[-1])
    test_dice = {r: test["metrics"][f"dice/{r}"]["mean"] for r in REGIONS}
    cases = read_cases(evaluated.with_name("cases.csv"))
    if subsets and evaluated.with_name("subsets.csv").exists():
        per_case = case_subset_means(evaluated.with_name("subsets.csv"))
        cases = [{**row, **per_case.get(row["case_id"], {})} for row in cases]
    return {
        "method": method, "seed": seed, "best_epoch": summary["best_epoch"], "checkpoint": checkpoint,
        "test_cases": test["cases"], "cases": cases,
        **{f"test_dice/{r}": value for r, value in test_dice.items()},
        "test_dice/mean": statistics.fmean(test_dice.values()),
        **{f"test_hd95/{r}": test["metrics"][f"hd95/{r}"]["mean"] for r in REGIONS},
        **{f"val_dice/{r}": scored[f"val_dice/{r}"] for r in REGIONS},
        "val_dice/mean": statistics.fmean(scored[f"val_dice/{r}"] for r in REGIONS),
        **{f"head/{s}": rows[-1].get(f"val_head_dice/{s}") for s in MODALITIES},
        "step_s": statistics.median(r["step_s"] for r in rows),
        "train_s": sum(r["time_s"] for r in rows),
        **subset_columns(test.get("subsets")),
    }


def _stale(test: dict, subsets: bool, checkpoint: str) -> bool:
    """An evaluation made from another checkpoint, or without the subsets asked for."""
    return Path(test["checkpoint"]).stem != checkpoint or (subsets and "subsets" not in test)


def read_cases(path: Path) -> list[dict[str, Any]]:
    """The per-case rows of an evaluation's ``cases.csv``: ``case_id`` and every metric as a number
    (NaN where a cell is empty)."""
    with path.open(newline="") as handle:
        return [{k: v if k == "case_id" else float(v or "nan") for k, v in row.items()} for row in csv.DictReader(handle)]


def case_subset_means(path: Path) -> dict[str, dict[str, float]]:
    """Per case of an evaluation's ``subsets.csv``: its Dice per region averaged over the subsets
    (``subsets_dice/<region>``) and the mean of the three (``subsets_dice/mean``), so that the
    15-subset average can be paired case by case like any per-case metric."""
    by_case: dict[str, list[dict[str, float]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            by_case.setdefault(row["case_id"], []).append({f"dice/{r}": float(row[f"dice/{r}"] or "nan") for r in REGIONS})
    means = {}
    for case_id, rows in by_case.items():
        finite = {r: [row[f"dice/{r}"] for row in rows if math.isfinite(row[f"dice/{r}"])] for r in REGIONS}
        region = {r: statistics.fmean(values) if values else math.nan for r, values in finite.items()}
        means[case_id] = {**{f"subsets_dice/{r}": v for r, v in region.items()},
                          "subsets_dice/mean": statistics.fmean(region.values())}
    return means


#: the 15-subset columns of a run scored with ``subsets``
SUBSET_KEYS = (*(f"subsets_dice/{r}" for r in REGIONS), "worst_subset_dice/mean")


def subset_columns(table: dict[str, Any] | None) -> dict[str, Any]:
    """The 15-subset average Dice per region and the worst subset's mean Dice (when scored)."""
    if table is None:
        return {}
    worst = table["worst"]
    return {**{f"subsets_dice/{r}": table["average"][f"dice/{r}"] for r in REGIONS},
            "worst_subset": worst["subset"],
            "worst_subset_dice/mean": statistics.fmean(worst[f"dice/{r}"] for r in REGIONS)}


def aggregate(runs: list[dict], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: ``(mean, std)`` over its runs (seeds, or folds) of every reported value (NaN
    where none is known); the 15-subset columns when every run of the method was scored with them."""
    done = Sweep(list(names), {name: [r for r in runs if r["method"] == name] for name in names})
    keys = [f"test_dice/{g}" for g in (*REGIONS, "mean")] + ["val_dice/mean"]
    keys += [f"head/{s}" for s in MODALITIES] + ["step_s", "train_s"]
    rows = summarize(done, [Column(key, key, lambda r, key=key: r.get(key)) for key in keys])
    for row in rows:
        mine = done.results[row["method"]]
        if mine and all(k in r for r in mine for k in SUBSET_KEYS):
            row.update({k: mean_std([r[k] for r in mine]) for k in SUBSET_KEYS})
    return rows


def paired_rows(runs: Sequence[dict], names: Sequence[str], reference: str) -> dict[str, dict[str, dict]]:
    """``{method: {metric: paired difference}}`` of every method but ``reference``: per metric of
    the per-case rows (Dice and HD95 per region, and whatever else evaluation writes), the
    difference to the reference on the cases both were scored on, each case's value first
    averaged over the method's runs (seeds); HD95-like metrics (lower is better) count a
    decrease as an improvement."""
    def per_case(name: str) -> dict[str, dict[str, float]]:
        mine = [run["cases"] for run in runs if run["method"] == name and run.get("cases")]
        metrics = list(dict.fromkeys(k for cases in mine for row in cases for k in row if k != "case_id"))
        return {m: case_means([{row["case_id"]: row.get(m) for row in cases} for cases in mine]) for m in metrics}

    base = per_case(reference)
    table = {}
    for name in names:
        own = per_case(name)
        if name != reference and own:
            table[name] = {m: paired_difference(values, base.get(m, {}), higher_is_better="hd95" not in m)
                           for m, values in own.items()}
    return table


def flat_paired(paired: dict[str, dict]) -> dict[str, Any]:
    """One method's paired differences as CSV columns ``vs_ref/<metric>_<mean|low|high|n|improved|worsened>``."""
    return {f"vs_ref/{metric}_{key}": value for metric, difference in paired.items() for key, value in difference.items()}


def paired_markdown(paired: dict[str, dict[str, dict]], reference: str,
                    label: Callable[[str], str] = lambda name: name) -> str:
    """The paired table: per method and metric the mean difference to ``reference`` [95 %
    bootstrap interval], and the cases it improved / worsened."""
    if not paired:
        return f"No method to compare with the reference ({label(reference)}) case by case.\n"
    metrics = list(dict.fromkeys(m for table in paired.values() for m in table))
    lines = [(f"Paired against {label(reference)}, case by case: mean difference over the cases both were "
              f"scored on [percentile bootstrap 95 % interval, {RESAMPLES:,} resamples of the cases, fixed seed]; "
              "a case's value is first averaged over its seeds; +n/-m = cases improved / worsened (for HD95 a "
              "decrease is an improvement). Over a few cases these intervals are wide: an interval that "
              "holds 0 does not tell the two apart."), ""]
    rows = [[label(name), str(max(d["n"] for d in table.values())), *(_paired_cell(table.get(m)) for m in metrics)]
            for name, table in paired.items()]
    return "\n".join(lines) + "\n" + markdown_table(["method", "cases", *metrics], rows)


def _paired_cell(difference: dict | None) -> str:
    if not difference or not difference["n"]:
        return "—"
    return f"{interval_cell(difference)} (+{difference['improved']}/-{difference['worsened']})"


def markdown(rows: list[dict], command: str, test_data: Path | None, checkpoint: str = "best") -> str:
    test = f"every case of {test_data}" if test_data is not None else "the cases the split leaves out (--split test)"
    with_subsets = bool(rows) and all(k in row for row in rows for k in SUBSET_KEYS)
    subset_header = " | 15-subset TC | 15-subset WT | 15-subset ET | worst subset mean" if with_subsets else ""
    lines = [
        (f"Each run's checkpoint is {CHECKPOINTS[checkpoint]}; it is scored once on {test}, "
         "which no run saw or selected on: test Dice mean ± std over seeds; val mean = validation mean "
         "Dice of the scored epoch; head = each sequence's auxiliary head alone (validation Dice, mean "
         "of regions) at the end; step s = median seconds per optimizer step; run min = training minutes."
         + (" 15-subset = test Dice averaged over the 15 non-empty subsets of the sequences; worst subset "
            "mean = the mean Dice of the regions of the worst of them." if with_subsets else "")),
        "", f"Command: `{command}`", "",
        ("| method | test Dice TC | test Dice WT | test Dice ET | test mean | val mean (selected epoch) "
         f"| head FLAIR | head T1 | head T1ce | head T2 | step s | run min{subset_header} |"),
        "|---" * (12 + 4 * with_subsets) + "|",
    ]
    for row in rows:
        cells = [plus_minus(row[f"test_dice/{g}"]) for g in (*REGIONS, "mean")] + [plus_minus(row["val_dice/mean"])]
        cells += [plus_minus(row[f"head/{s}"]) for s in MODALITIES]
        cells += [f"{row['step_s'][0]:.2f}", f"{row['train_s'][0] / 60:.1f}"]
        cells += [plus_minus(row[k]) for k in SUBSET_KEYS] if with_subsets else []
        lines.append(f"| {row['method']} ({row['runs']} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], unit: str = "seeds") -> None:
    """Test Dice per region and mean, one group of bars per method (error bars: std over
    ``unit``, the seeds or the folds of cross-validation)."""
    from matplotlib.figure import Figure

    regions = (*REGIONS, "mean")
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(regions)
    colors = {"TC": "tab:red", "WT": "tab:green", "ET": "tab:blue", "mean": "0.3"}
    for i, region in enumerate(regions):
        values = [[v if math.isfinite(v) else 0.0 for v in row[f"test_dice/{region}"]] for row in rows]
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], [v[0] for v in values], width,
               yerr=[v[1] for v in values], capsize=2, color=colors[region], label=region)
    ax.set_xticks(range(len(rows)), [f"{row['method']}\n({row['runs']} {unit})" for row in rows], fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"test Dice (mean ± std over {unit})")
    ax.set_title("Selected on validation, scored on held-out cases", fontsize=10)
    ax.legend(ncols=4, fontsize=9, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))


def plot_paired(path: Path, paired: dict[str, dict[str, dict]], reference: str,
                label: Callable[[str], str] = lambda name: name) -> None:
    """The paired differences to ``reference``: per method, the mean per-case difference of Dice
    (left) and HD95 (right) per region with its bootstrap 95 % interval, around a line at 0."""
    from matplotlib.figure import Figure

    names = list(paired)
    fig = Figure(figsize=(max(8.0, 2.6 * len(names) + 3), 4.2), layout="constrained")
    colors = {"TC": "tab:red", "WT": "tab:green", "ET": "tab:blue"}
    for ax, (metric, unit) in zip(fig.subplots(1, 2), (("dice", "Dice"), ("hd95", "HD95 (mm, lower is better)"))):
        for i, region in enumerate(REGIONS):
            shown = [(j, d) for j, name in enumerate(names) for d in [paired[name].get(f"{metric}/{region}")]
                     if d and d["n"]]
            ax.errorbar([j + 0.2 * (i - 1) for j, _ in shown], [d["mean"] for _, d in shown],
                        yerr=[[d["mean"] - d["low"] for _, d in shown], [d["high"] - d["mean"] for _, d in shown]],
                        fmt="o", capsize=3, color=colors[region], label=region)
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        ax.set_xticks(range(len(names)), [label(name) for name in names], fontsize=8, rotation=15, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(unit, fontsize=10)
        ax.set_ylabel("difference to the reference")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Per-case paired difference to {label(reference)} (mean, bootstrap 95 % interval)", fontsize=10)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
