"""Real BraTS cases: cross-validation by source, same budget for every row, one table.

The labelled cases of ``--data`` (e.g. the BraTS 2018 cases of ``../shared/data/real``) are
split into ``--folds`` folds **by source** (the institution in the case id,
``Brats18_<source>_...``; no source is split across folds), so a test fold holds scanners no
training case came from. Per fold, the other folds' cases train (one of them, the first by
name, validates: epoch selection), and the fold's cases are the test cases, scored once:

* full-sequence Dice WT/TC/ET on each case's own 1 mm grid;
* the 15 non-empty subsets of the four sequences (the others switched off through the
  modality mask; early fusion gets zero channels): their average per region, and the worst
  subset (``brats-cggm evaluate --subsets``);
* each sequence's auxiliary head alone (validation Dice at the end) and seconds per step.

Every run is an ordinary ``brats-cggm compare`` run folder at the ``cpu-real`` preset
(``OUT/<group>/fold<k>/runs/<method>-seed0``): finished runs are reused and unfinished ones
continue, so the table can be filled across sessions (``--rows`` picks rows). The table
(mean ± std over the folds that are done) goes to ``--results`` as real_cv.md|csv|json|png.

Phantom pre-training: ``phantom-calibrated`` scores, on each test fold, a network trained on
phantoms only (30 calibrated phantoms, ``cpu-real`` for 60 epochs, trained once per network
into ``OUT/phantom-pretrain-<network>``); the ``-init`` rows start each fold's real training
from those weights (``--init``), with the same real-data budget as every other row.

    python bench/real_cv.py --data ../shared/data/real/brats2018 --out runs/real_cv
    python bench/real_cv.py --data ../shared/data/real/brats2018 --rows ef,hemis-none --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_cggm import MODALITIES
from brats_cggm.data.layouts import discover
from brats_cggm.data.splits import save_split
from multimodal_general.io import atomic_write_text


@dataclass(frozen=True)
class Row:
    """One row of the table: a ``brats-cggm compare`` method trained on each fold, or (no
    ``fusion``) a trained model scored on each test fold."""

    label: str
    #: the compare method; for a scored model, a shipped model's name or a model file (``PRETRAINED``: the
    #: pre-training run)
    method: str
    fusion: str | None = None
    #: the phantom pre-training (a key of ``PRETRAIN``) the row starts from, or (scored) is
    init: str | None = None

    @property
    def group(self) -> str:
        """The folder (under OUT) of the row's runs: rows that share it share runs."""
        return f"{self.fusion}-init" if self.init else str(self.fusion)


#: a scored row's stand-in for its phantom pre-training run
PRETRAINED = "phantom-pretrain"
ROWS: dict[str, Row] = {
    "ef": Row("early fusion (4-channel U-Net)", "early_fusion", "mean"),
    "ef-dropout": Row("early fusion + sequence dropout", "early_fusion_dropout", "mean"),
    "mean-none": Row("4 branches, mean fusion, joint training", "none", "mean"),
    "hemis-none": Row("4 branches, HeMIS fusion, joint training", "none", "hemis"),
    "attention-none": Row("4 branches, attention fusion, joint training", "none", "attention"),
    "hemis-cggm": Row("4 branches, HeMIS fusion, CGGM", "cggm", "hemis"),
    "hemis-mmpareto": Row("4 branches, HeMIS fusion, MMPareto", "mmpareto", "hemis"),
    "hemis-dropout": Row("4 branches, HeMIS fusion, sequence dropout", "modality_dropout", "hemis"),
    "hemis-dropout-init": Row("phantom pre-training, then 4 branches, HeMIS fusion, sequence dropout",
                              "modality_dropout", "hemis", init="hemis"),
    "ef-dropout-init": Row("phantom pre-training, then early fusion + sequence dropout", "early_fusion_dropout",
                           "mean", init="early_fusion"),
    # no real training: the phantom-trained demo model (3 mm, mean fusion, old phantoms), and
    # the pre-training run (calibrated phantoms, the cpu-real recipe), scored on every test fold
    "phantom-only": Row("phantom-only demo model (no real training)", "brats_cggm_phantom_demo"),
    "phantom-calibrated": Row("calibrated phantoms only, 4 branches, cpu-real recipe (no real training)",
                              PRETRAINED, init="hemis"),
}
#: the phantom pre-training: ``brats-cggm phantom`` and ``train`` options, and per network its own
PHANTOMS = ("--cases", "30", "--size", "96", "--seed", "0")
PRETRAIN_RECIPE = ("--preset", "cpu-real", "--epochs", "60", "--set", "validation.every=20")
#: the networks a phantom pre-training exists for
PRETRAIN = ("hemis", "early_fusion")


def pretrain_options(network: str) -> list[str]:
    """``brats-cggm train`` options of the phantom pre-training of ``network`` (of ``PRETRAIN``)."""
    if network == "hemis":
        return ["--set", "network.fusion=hemis"]
    from brats_cggm.compare import early_fusion_overrides

    widths = early_fusion_overrides(PRESET, {})  # those compare's early-fusion rows train at
    return ["--network", "early_fusion", "--set", f"network.overrides={json.dumps(widths)}"]
PRESET = "cpu-real"


def source_of(case_id: str) -> str:
    """The institution of a BraTS 2018 training case id (``Brats18_TCIA01_201_1`` -> ``TCIA01``);
    a case id of another form is its own source."""
    match = re.match(r"Brats\d\d_([A-Za-z0-9]+)_", case_id)
    return match.group(1) if match else case_id


def source_folds(case_ids: Sequence[str], folds: int) -> dict:
    """A split file of ``folds`` folds by source: sources go, largest first, to the fold with
    the fewest cases; fold k's cases are its test cases, the others train, and the first of
    those by name validates."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for case_id in sorted(case_ids):
        by_source[source_of(case_id)].append(case_id)
    if len(by_source) < folds:
        raise SystemExit(f"error: {len(by_source)} source(s) cannot make {folds} folds by source")
    parts: list[list[str]] = [[] for _ in range(folds)]
    for source in sorted(by_source, key=lambda s: (-len(by_source[s]), s)):
        min(parts, key=len).extend(by_source[source])
    split = []
    for k in range(folds):
        rest = sorted(c for j, part in enumerate(parts) if j != k for c in part)
        split.append({"train": rest[1:], "val": rest[:1], "test": sorted(parts[k])})
    return {"seed": 0, "scheme": f"{folds} folds by source", "folds": split}


def fold_settings(split_file: Path, fold: int, row: Row, out: Path, epochs: int | None) -> dict:
    settings = {"data.split": str(split_file.resolve()), "data.fold": fold, "network.fusion": row.fusion,
                "network.sequence_dropout": 0.0}
    if row.init:
        settings["init"] = str(pretrain(out, row.init))
    return {**settings, **({"optim.epochs": epochs} if epochs else {})}


def pretrain(out: Path, network: str) -> Path:
    """OUT/phantom-pretrain-<network>: the phantom-only network (trained once, then reused)."""
    import subprocess
    import sys

    run = out / f"{PRETRAINED}-{network}"
    if not (run / "summary.json").exists():
        cli = [str(Path(sys.executable).with_name("brats-cggm"))]
        if not (out / "phantoms").is_dir():
            subprocess.run([*cli, "phantom", "--out", str(out / "phantoms"), *PHANTOMS], check=True)
        subprocess.run([*cli, "train", "--data", str(out / "phantoms"), "--out", str(run), *PRETRAIN_RECIPE,
                        *pretrain_options(network)], check=True)
    return run


def run_rows(data: Path, out: Path, rows: Sequence[str], folds: int, epochs: int | None) -> None:
    from brats_cggm.compare import compare

    labelled = [c.case_id for c in discover(data).cases if c.label is not None]
    split_file = save_split(source_folds(labelled, folds), out / "split.json")
    for key in rows:  # row by row over the folds: each finished row is complete
        row = ROWS[key]
        for fold in range(folds):
            if row.fusion is None:
                model = pretrain(out, row.init) if row.method == PRETRAINED else Path(row.method)
                score_model(model, data, split_file, fold, out / key / f"fold{fold}.json")
                continue
            compare(data, [row.method], 1, out / row.group / f"fold{fold}", preset=PRESET,
                    settings=fold_settings(split_file, fold, row, out, epochs), subsets=True)


def score_model(model: Path, data: Path, split_file: Path, fold: int, out: Path) -> None:
    """A trained model file on one fold's test cases (full set and the 15 subsets), written
    as a run row (nothing was trained: no validation, heads or step time)."""
    import math
    import statistics

    from brats_cggm.compare import subset_columns
    from brats_cggm.evaluation import evaluate_cases
    from brats_cggm.inference.segmenter import Segmenter
    from brats_cggm.metrics import REGIONS

    if out.exists():
        return
    test = set(json.loads(split_file.read_text())["folds"][fold]["test"])
    cases = [c for c in discover(data).cases if c.case_id in test]
    _, summary, _ = evaluate_cases(Segmenter.load(model), cases, out.with_suffix(""), {"model": str(model)},
                                   subsets=True)
    dice = {r: summary["metrics"][f"dice/{r}"]["mean"] for r in REGIONS}
    nan = math.nan
    row = {"method": str(model), "seed": 0, "best_epoch": 0, "test_cases": len(cases),
           **{f"test_dice/{r}": v for r, v in dice.items()}, "test_dice/mean": statistics.fmean(dice.values()),
           "val_dice/mean": nan, **{f"head/{m}": nan for m in MODALITIES},
           "step_s": nan, "train_s": nan, **subset_columns(summary["subsets"])}
    atomic_write_text(out, json.dumps(row, indent=1) + "\n")


def collect(out: Path, rows: Sequence[str], folds: int) -> list[dict]:
    """The scored run of every row x fold that has finished, labelled with its row key."""
    from brats_cggm.compare import score_run

    runs = []
    for key in rows:
        row = ROWS[key]
        for fold in range(folds):
            if row.fusion is None:
                scored = out / key / f"fold{fold}.json"
                if scored.exists():
                    runs.append({**json.loads(scored.read_text()), "method": key, "fold": fold})
                continue
            run_dir = out / row.group / f"fold{fold}" / "runs" / f"{row.method}-seed0"
            if (run_dir / "summary.json").exists():
                runs.append({**score_run(run_dir, row.method, 0, None, "cpu", print, subsets=True),
                             **telemetry_means(run_dir), "method": key, "fold": fold})
    return runs


#: CGGM's per-sequence telemetry the table summarises: the magnitude coefficient and the cosine
#: between the fused gradient and the sequence head's gradient (the direction term)
TELEMETRY = ("B", "cos")


def telemetry_means(run_dir: Path) -> dict[str, float]:
    """``telemetry/<B|cos>/<seq>``: the mean over the second half of a run's steps (none without them)."""
    import csv
    import statistics

    with (run_dir / "telemetry.csv").open() as handle:
        steps = list(csv.DictReader(handle))
    half = steps[len(steps) // 2:]
    names = [f"{t}/{s}" for t in TELEMETRY for s in MODALITIES]
    if not half or any(name not in half[0] for name in names):
        return {}
    return {f"telemetry/{name}": statistics.fmean(float(step[name]) for step in half) for name in names}


def telemetry_lines(runs: list[dict]) -> list[str]:
    """The telemetry table of the rows whose runs logged it (mean ± std over folds)."""
    from multimodal_general.runs.series import mean_std, plus_minus

    logged = [r for r in runs if "telemetry/B/flair" in r]
    if not logged:
        return []
    lines = ["", ("CGGM's telemetry per sequence, mean over the second half of each run's steps (mean ± std over "
                  "folds): B scales the sequence's encoder gradient (1 = unchanged); cos = cosine between the "
                  "fused gradient and the sequence head's gradient."), "",
             "| configuration | " + " | ".join(f"{t} {s}" for t in TELEMETRY for s in MODALITIES) + " |",
             "|---" * (1 + len(TELEMETRY) * len(MODALITIES)) + "|"]
    for key in dict.fromkeys(r["method"] for r in logged):
        mine = [r for r in logged if r["method"] == key]
        cells = [plus_minus(mean_std([r[f"telemetry/{t}/{s}"] for r in mine]), 2) for t in TELEMETRY for s in MODALITIES]
        lines.append(f"| {ROWS[key].label} | " + " | ".join(cells) + " |")
    return lines


def write_table(runs: list[dict], rows: Sequence[str], folds: int, results: Path, command: str) -> str:
    """real_cv.md|csv|json|png: per row, mean ± std over the folds done."""
    from brats_cggm.compare import SUBSET_KEYS, aggregate, plot
    from multimodal_general.experiments.harness import results_csv
    from multimodal_general.io import atomic_write_text, json_safe
    from multimodal_general.runs.provenance import provenance
    from multimodal_general.runs.series import plus_minus

    done = [r for r in rows if any(run["method"] == r for run in runs)]
    table = aggregate(runs, done)
    regions = ("WT", "TC", "ET")
    lines = [
        (f"Cross-validation on real BraTS 2018 cases, {folds} folds by source (no institution in two folds), "
         "`cpu-real` preset for every row (2 mm, 64^3 patches, 150 epochs, AdamW 1e-3); each run selected on one "
         "validation case and scored once on its test fold, on each case's 1 mm grid. Mean ± std over folds "
         "(`folds` = folds done). 15-subset = Dice averaged over the 15 non-empty subsets of the sequences "
         "(the others switched off; early fusion gets zero channels); worst = mean Dice of the regions of "
         "the worst subset; head = each sequence's auxiliary head alone (validation, mean of regions); "
         "s/step = median seconds per optimizer step (2 patches, with the heads)."),
        "", f"Command: `{command}`", "",
        ("| configuration | folds | WT | TC | ET | 15-subset WT | 15-subset TC | 15-subset ET | worst subset "
         "| head FLAIR | head T1 | head T1ce | head T2 | s/step |"),
        "|---" * 14 + "|",
    ]
    for row in table:
        cells = [plus_minus(row[f"test_dice/{r}"]) for r in regions]
        cells += [plus_minus(row[f"subsets_dice/{r}"]) for r in regions] + [plus_minus(row[SUBSET_KEYS[-1]])]
        cells += [plus_minus(row[f"head/{m}"]) for m in MODALITIES]
        cells.append(f"{row['step_s'][0]:.2f}")
        lines.append(f"| {ROWS[row['method']].label} | {row['runs']} | " + " | ".join(cells) + " |")
    worst = sorted({f"{ROWS[r['method']].label}, fold {r['fold']}: {r['worst_subset']}" for r in runs})
    lines += ["", "Worst subset of each run: " + "; ".join(worst) + "."] + telemetry_lines(runs)
    markdown = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "real_cv.md", markdown)
    atomic_write_text(results / "real_cv.csv", results_csv(table))
    atomic_write_text(results / "real_cv.json", json.dumps(
        json_safe({"command": command, "provenance": provenance("torch", "monai"), "rows": table, "runs": runs}),
        indent=1, default=str) + "\n")
    plot(results / "real_cv.png", table, unit="folds")
    return markdown


def card_summary(out: Path, key: str, folds: int, command: str) -> dict:
    """What a model card says about a row's recipe on cases it never saw: the full-sequence Dice
    and the 15-subset table, each the mean over the folds (per fold in ``folds``)."""
    from brats_cggm.metrics import REGIONS

    row = ROWS[key]
    tables = []
    for fold in range(folds):
        summary = out / row.group / f"fold{fold}" / "runs" / f"{row.method}-seed0" / "evaluation" / "test" / "summary.json"
        if summary.exists():
            tables.append(json.loads(summary.read_text()))
    if not tables:
        raise SystemExit(f"error: no fold of row {key} is done")

    def over_folds(values: list[float]) -> float:
        return round(sum(values) / len(values), 4)

    full = {r: over_folds([t["metrics"][f"dice/{r}"]["mean"] for t in tables]) for r in REGIONS}
    subsets = {name: {r: over_folds([t["subsets"]["subsets"][name][f"dice/{r}"] for t in tables]) for r in REGIONS}
               for name in tables[0]["subsets"]["subsets"]}
    average = {r: over_folds([v[r] for v in subsets.values()]) for r in REGIONS}
    worst = min(subsets, key=lambda name: sum(subsets[name].values()))
    return {"what": f"the recipe ({row.label}), cross-validated by source on real BraTS 2018 cases: "
                    "Dice on the test folds' cases (never trained on or selected on), mean over folds",
            "command": command, "folds": len(tables), "test_cases": sum(t["cases"] for t in tables),
            "dice": full, "subsets": subsets, "subset_average": average, "worst_subset": {"subset": worst, **subsets[worst]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of labelled BraTS cases")
    parser.add_argument("--out", type=Path, default=Path("runs/real_cv"))
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the preset's)")
    parser.add_argument("--table-only", action="store_true", help="write the table from the runs that are done")
    parser.add_argument("--card", metavar="ROW", help="also write RESULTS/real_cv_card.json, the row's figures for a "
                        "model card (brats-cggm export --evaluation)")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not args.data.is_dir():
        raise SystemExit(f"error: {args.data}: no such folder of labelled BraTS cases")
    if not args.table_only:
        run_rows(args.data, args.out, rows, args.folds, args.epochs)
    command = (f"python bench/real_cv.py --data DATA --rows {','.join(rows)} --folds {args.folds}"
               + (f" --epochs {args.epochs}" if args.epochs else ""))
    print(write_table(collect(args.out, rows, args.folds), rows, args.folds, args.results, command))
    if args.card:
        from multimodal_general.io import atomic_write_text

        card = card_summary(args.out, args.card, args.folds, command)
        atomic_write_text(args.results / "real_cv_card.json", json.dumps(card, indent=1) + "\n")


if __name__ == "__main__":
    main()
