"""Real BraTS cases: cross-validation by source, a fixed budget for every row, per-case rows,
each row compared to a reference row case by case, one table.

The protocol (docs/real_data.md, "Protocol"):

* **Cases.** Every labelled case with all four sequences under ``--data`` (several folders,
  or a parent such as ``../shared/data/real``: 13 today, the twelve of BraTS 2018 and
  BraTS2021_00006); cases missing a sequence (``partial/``) or a label are left out. They are
  linked into ``OUT/cases``, one data folder for every run.
* **Folds by source.** ``--folds`` folds (the institution in the case id,
  ``Brats18_<source>_...``; another id is its own source; no source in two folds), so a test
  fold holds scanners no training case came from. Per fold, the other folds' cases train, but
  the first of them by name, which is only watched (validation curves).
* **Fixed budget, no selection.** Every run trains for the preset's epochs (``--epochs``) and
  its last checkpoint is scored, once, on the fold's test cases: full-sequence Dice and HD95
  per region per case on each case's own 1 mm grid (and whatever else evaluation scores per
  case), the 15 non-empty subsets of the sequences (their average per region and the worst
  subset), each sequence's auxiliary head (validation Dice at the end), seconds per step.
* **Paired.** Each row against ``--reference`` (default: the shipped recipe): per metric the
  mean per-case difference with its bootstrap 95 % interval, a case's value first averaged over
  the ``--seeds`` (``brats_cggm.compare.paired_rows``). Over 13 cases these intervals are wide.

Every run is an ordinary ``brats-cggm compare`` run folder at the ``cpu-real`` preset
(``OUT/<group>/fold<k>/runs/<method>-seed<s>``): finished runs are reused and unfinished ones
continue, so the table fills up across sessions (``--rows`` picks rows). Each finished run's
row with its per-case rows is kept in ``RESULTS/real_cv_runs/<row>-fold<k>-seed<s>.json`` (commit
it: the table can be rebuilt from these files alone with ``--table-only``). The table goes to
``--results`` as real_cv.md|csv|json|png and real_cv_paired.png (the paired differences).

Phantom pre-training: ``phantom-calibrated`` scores, on each test fold, a network trained on
phantoms only (30 calibrated phantoms, ``cpu-real`` for 60 epochs, trained once per network
into ``OUT/phantom-pretrain-<network>``); the ``-init`` rows start each fold's real training
from those weights (``--init``), with the same real-data budget as every other row.

    python bench/real_cv.py --data ../shared/data/real --out runs/real_cv_paired
    python bench/real_cv.py --data ../shared/data/real --rows ef-dropout-init,ef --seeds 2
    python bench/real_cv.py --data ../shared/data/real --table-only

The candidate screen (issue 24, 2c): the ``screen-*`` rows (C1-C4 for four branches and early
fusion) trained on each outer fold's training cases only (``OUT/split-inner.json``: split again
by source, its first fold), each for its epochs at equal wall time from a side-by-side timing:

    python bench/training_speed.py --patch 64 --variants screen-slots-c1,...,screen-ef-c4 \
        --out bench/results/training_speed_screen.json
    python bench/real_cv.py --data ../shared/data/real --screen
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_cggm import MODALITIES
from brats_cggm.data.layouts import LAYOUTS, Case, discover
from brats_cggm.data.splits import save_split
from brats_cggm.errors import InconsistentCase
from multimodal_general.cli_support import parse_settings
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
    #: the labelled cases that lack sequences (``partial/``) also train, in the folds their
    #: source is not tested in (``train --partial``); the test cases are the same as every row's
    partial: bool = False
    #: sequence dropout under a method that sets none of its own (CGGM with dropout)
    sequence_dropout: float = 0.0
    #: (a ``partial`` row) the row it is without those cases: a fold that gains none of them (its
    #: test cases share their source) trains exactly that row's run, which is reused
    same_as: str | None = None
    #: an ablation's own settings over the method's (``--set`` names), and the name its runs'
    #: folder gets for them
    ablation: tuple[tuple[str, object], ...] = ()
    ablation_name: str = ""
    #: the screen's chosen candidate (a key of ``CANDIDATES``) the row's network is built as: its
    #: settings join the row's, its phantom pre-training is built the same, and the row trains for
    #: that candidate's epochs at equal wall time (``--budget``); "" is today's network
    candidate: str = ""

    @property
    def group(self) -> str:
        """The folder (under OUT) of the row's runs: rows that share it share runs."""
        return ((f"{self.fusion}-init" if self.init else str(self.fusion)) + ("-partial" if self.partial else "")
                + ("-dropout" if self.sequence_dropout else "") + (f"-{self.ablation_name}" if self.ablation else "")
                + (f"-{self.candidate}" if self.candidate else ""))

    @property
    def screen_row(self) -> str:
        """The screen row of the row's network (its candidate's budget)."""
        return f"screen-{'ef' if self.method.startswith('early_fusion') else 'slots'}-{self.candidate}"


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
    "slots-dropout": Row("4 branches, slot fusion, sequence dropout", "modality_dropout", "slots"),
    "slots-none": Row("4 branches, slot fusion, joint training", "none", "slots"),
    "slots-cggm-paper": Row("4 branches, slot fusion, CGGM (paper's rule)", "cggm-paper", "slots"),
    "slots-dropout-partial": Row("4 branches, slot fusion, sequence dropout, + the FLAIR/T1ce-only cases",
                                 "modality_dropout", "slots", partial=True, same_as="slots-dropout"),
    "ef-dropout-partial": Row("early fusion + sequence dropout, + the FLAIR/T1ce-only cases (zero-filled)",
                              "early_fusion_dropout", "mean", partial=True, same_as="ef-dropout"),
    "slots-cggm-paper-dropout": Row("4 branches, slot fusion, sequence dropout, CGGM (paper's rule)", "cggm-paper",
                                    "slots", sequence_dropout=0.25),
    "slots-cggm-deficit-dropout": Row("4 branches, slot fusion, sequence dropout, CGGM deficit variant (ours)",
                                      "cggm-deficit", "slots", sequence_dropout=0.25),
    "slots-cggm-deficit-dropout-nodir": Row("the same, CGGM deficit variant without the direction term (lam 0)",
                                            "cggm-deficit", "slots", sequence_dropout=0.25,
                                            ablation=(("balancer.lam", 0.0),), ablation_name="lam0"),
    "slots-cggm-deficit-dropout-lr": Row("the same without the direction term, B as each encoder's learning rate",
                                         "cggm-deficit", "slots", sequence_dropout=0.25,
                                         ablation=(("balancer.lam", 0.0),
                                                   ("balancer.options", {"scale_by": "learning_rate"})),
                                         ablation_name="lam0-lr"),
    # the candidate for the default (issue 24's gate): everything that helped the four-branch network,
    # with CGGM's magnitude term where AdamW cannot normalise it away (B as each encoder's rate)
    "slots-cggm-deficit-lr-partial-init": Row("phantom pre-training, then 4 branches, slot fusion, sequence dropout, "
                                              "CGGM deficit, lam 0, B as learning rate, + the FLAIR/T1ce-only cases",
                                              "cggm-deficit", "slots", init="slots", partial=True, sequence_dropout=0.25,
                                              ablation=(("balancer.lam", 0.0),
                                                        ("balancer.options", {"scale_by": "learning_rate"})),
                                              ablation_name="lam0-lr"),
    # the screen's choice for the four-branch network (C3, one level deeper), through the outer
    # protocol: the best recipe without CGGM, and the default's candidate (issue 24's gate)
    "slots-c3-dropout-partial-init": Row("C3 (one level deeper): phantom pre-training, then 4 branches, slot fusion, "
                                         "sequence dropout, + the FLAIR/T1ce-only cases", "modality_dropout", "slots",
                                         init="slots", partial=True, ablation=(("network.heads", False),),
                                         ablation_name="noheads", candidate="c3"),
    "slots-c3-cggm-deficit-lr-partial-init": Row("C3: phantom pre-training, then 4 branches, slot fusion, sequence "
                                                 "dropout, CGGM deficit, lam 0, B as learning rate, + the FLAIR/T1ce-only "
                                                 "cases", "cggm-deficit", "slots", init="slots", partial=True,
                                                 sequence_dropout=0.25,
                                                 ablation=(("balancer.lam", 0.0),
                                                           ("balancer.options", {"scale_by": "learning_rate"})),
                                                 ablation_name="lam0-lr", candidate="c3"),
    # the screen's choice for early fusion (C2, twice as wide; 0.0003 ahead of C1) through the outer protocol
    "ef-c2-dropout-init": Row("C2 (twice as wide): phantom pre-training, then early fusion + sequence dropout",
                              "early_fusion_dropout", "mean", init="early_fusion", candidate="c2"),
    "hemis-dropout-init": Row("phantom pre-training, then 4 branches, HeMIS fusion, sequence dropout",
                              "modality_dropout", "hemis", init="hemis"),
    "ef-dropout-init": Row("phantom pre-training, then early fusion + sequence dropout", "early_fusion_dropout",
                           "mean", init="early_fusion"),
    # network.heads false: under joint training the heads are telemetry only, and the network
    # trains to the same weights without them (tests/test_training.py), at half the step time
    "slots-dropout-init": Row("phantom pre-training, then 4 branches, slot fusion, sequence dropout", "modality_dropout",
                              "slots", init="slots", ablation=(("network.heads", False),), ablation_name="noheads"),
    "slots-dropout-partial-init": Row("phantom pre-training, then 4 branches, slot fusion, sequence dropout, "
                                      "+ the FLAIR/T1ce-only cases", "modality_dropout", "slots", init="slots",
                                      partial=True, same_as="slots-dropout-init",
                                      ablation=(("network.heads", False),), ablation_name="noheads"),
    # no real training: the phantom-trained demo model (3 mm, mean fusion, old phantoms), and
    # the pre-training run (calibrated phantoms, the cpu-real recipe), scored on every test fold
    "phantom-only": Row("phantom-only demo model (no real training)", "brats_cggm_phantom_demo"),
    "phantom-calibrated": Row("calibrated phantoms only, 4 branches, cpu-real recipe (no real training)",
                              PRETRAINED, init="hemis"),
}
#: issue 24's candidate screen (2c), declared before any run: C1 today's widths, C2 twice as
#: wide, C3 one level deeper, C4 C1 on 96^3 patches; each for the four-branch network (slot
#: fusion, sequence dropout, joint training without the heads: the same network at its cost)
#: and for early fusion (compare derives its widths from the same ``network.overrides``).
#: bench/training_speed.py's ``screen-*`` variants are the same networks (a test checks it).
CANDIDATES: dict[str, tuple[tuple[str, object], ...]] = {
    "c1": (),
    "c2": (("network.overrides", {"channels": [16, 32, 64, 128], "head_channels": 16}),),
    "c3": (("network.overrides", {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2, 2]}),),
    "c4": (("preprocess.patch_size", [96, 96, 96]),),
}
SCREEN_ROWS = {
    **{f"screen-slots-{c}": Row(f"{c.upper()}: 4 branches, slots, dropout, no heads", "modality_dropout", "slots",
                                ablation=(("network.heads", False), *settings), ablation_name=f"screen-{c}")
       for c, settings in CANDIDATES.items()},
    **{f"screen-ef-{c}": Row(f"{c.upper()}: early fusion, dropout", "early_fusion_dropout", "mean",
                             ablation=(("network.heads", False), *settings), ablation_name=f"screen-{c}")
       for c, settings in CANDIDATES.items()},
}
ROWS.update(SCREEN_ROWS)
#: the screen's split: each outer fold's training cases only, split again by source
INNER_SPLIT = "split-inner.json"
#: the rows of the protocol now; the shipped recipe is the reference of the paired columns
DEFAULT_ROWS = ("ef-dropout-init", "ef", "ef-dropout")
REFERENCE = "ef-dropout-init"
#: a fixed budget: every run's last checkpoint is scored (no selection on a single validation case)
CHECKPOINT = "last"
#: the phantom pre-training: ``brats-cggm phantom`` and ``train`` options, and per network its own
PHANTOMS = ("--cases", "30", "--size", "96", "--seed", "0")
PRETRAIN_RECIPE = ("--preset", "cpu-real", "--epochs", "60", "--set", "validation.every=20")
#: the networks a phantom pre-training exists for
PRETRAIN = ("hemis", "slots", "early_fusion")


def candidate_settings(candidate: str) -> dict:
    """The ``--set`` settings of a screen candidate (a key of ``CANDIDATES``); none for "" (today's network)."""
    return dict(CANDIDATES[candidate]) if candidate else {}


def widths(key: str) -> str:
    """The encoder widths of row ``key``'s network, e.g. ``8-16-32-64`` (a model card's description)."""
    from brats_cggm.compare import early_fusion_overrides

    # early fusion is built at the four-branch network's widths: the preset's, or the candidate's
    return "-".join(map(str, early_fusion_overrides(PRESET, candidate_settings(ROWS[key].candidate))["channels"]))


def pretrain_options(network: str, candidate: str = "") -> list[str]:
    """``brats-cggm train`` options of the phantom pre-training of ``network`` (of ``PRETRAIN``),
    built as the screen's ``candidate`` when one is named."""
    settings = candidate_settings(candidate)
    if network == "early_fusion":
        from brats_cggm.compare import early_fusion_overrides

        # the widths compare's early-fusion rows train at (the candidate's, when it names some)
        settings["network.overrides"] = early_fusion_overrides(PRESET, settings)
    own = [item for name, value in settings.items() for item in ("--set", f"{name}={json.dumps(value)}")]
    if network == "hemis":
        return ["--set", "network.fusion=hemis", *own]
    if network == "slots":  # no auxiliary heads: the same network, half the step time
        return ["--set", "network.fusion=slots", "--set", "network.heads=false", *own]
    return ["--network", "early_fusion", *own]


PRESET = "cpu-real"


def source_of(case_id: str) -> str:
    """The institution of a BraTS 2018 training case id (``Brats18_TCIA01_201_1`` -> ``TCIA01``), or
    the challenge of a BraTS 2015 copy of a 2013 case (``brats_2013_pat0001_1`` -> ``2013``, the
    source of ``Brats18_2013_*``); a case id of another form is its own source."""
    match = re.match(r"Brats\d\d_([A-Za-z0-9]+)_", case_id) or re.match(r"brats_(\d{4})_pat", case_id)
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


def labelled_cases(folders: Sequence[Path]) -> list[Case]:
    """Every labelled case with all four sequences under ``folders`` (each a data folder or a
    parent of several, e.g. ``shared/data/real``), by case id: a case that lacks a sequence
    (``partial/``) or a label (images only) is left out; a case id found twice is an error."""
    found: dict[str, Case] = {}
    for folder in folders:
        for layout in (name for name, spec in LAYOUTS.items() if spec.suffixes):
            try:
                cases = discover(folder, layout).cases
            except InconsistentCase:  # no case of this layout there
                continue
            for case in (c for c in cases if c.label is not None):
                if case.case_id in found:
                    raise SystemExit(f"error: case {case.case_id} is both in {found[case.case_id].label.parent} "
                                     f"and in {case.label.parent}")
                found[case.case_id] = case
    if not found:
        raise SystemExit(f"error: no labelled case with all four sequences in {', '.join(map(str, folders))}")
    layouts = sorted({c.layout for c in found.values()})
    if len(layouts) > 1:
        raise SystemExit(f"error: labelled cases of several layouts ({', '.join(layouts)}) cannot train together")
    return [found[case_id] for case_id in sorted(found)]


def partial_cases(folders: Sequence[Path]) -> list[Case]:
    """Every labelled case under ``folders`` that lacks a sequence (``partial/``), by case id."""
    found: dict[str, Case] = {}
    for folder in folders:
        for layout in (name for name, spec in LAYOUTS.items() if spec.suffixes):
            try:
                cases = discover(folder, layout, partial=True).cases
            except InconsistentCase:
                continue
            found.update({c.case_id: c for c in cases if c.label is not None and None in c.images})
    return [found[case_id] for case_id in sorted(found)]


def with_partial(split: dict, partial: Sequence[str]) -> dict:
    """``split`` with the ``partial`` case ids added to the training cases of every fold whose
    test cases come from none of their sources (a source is tested in one fold only)."""
    folds = []
    for fold in split["folds"]:
        tested = {source_of(c) for c in fold["test"]}
        extra = [c for c in partial if source_of(c) not in tested]
        folds.append({**fold, "train": sorted(fold["train"] + extra)})
    return {**split, "scheme": split["scheme"] + ", plus the cases that lack sequences in training", "folds": folds}


def inner_split(split: dict, folds: int = 3) -> dict:
    """The candidate screen's split: inner fold k holds outer fold k's training (and watched)
    cases only, split by source as the protocol splits (its first inner fold): no outer test
    case is trained on, watched or scored."""
    inner = []
    for fold in split["folds"]:
        inner.append(source_folds(fold["val"] + fold["train"], folds)["folds"][0])
    return {"seed": 0, "scheme": f"inner split of each outer fold's training cases ({folds} folds by source, the first)",
            "folds": inner}


def screen_epochs(budget: Path) -> dict[str, int]:
    """``{screen row: epochs}`` at equal wall time, from a bench/training_speed.py JSON that timed the
    ``screen-*`` variants side by side."""
    if not budget.is_file():
        raise SystemExit(f"error: {budget}: no such file (run bench/training_speed.py --patch 64 --variants "
                         f"{','.join(SCREEN_ROWS)} --out {budget})")
    rows = json.loads(budget.read_text())["rows"]
    epochs = {row["variant"]: row.get("screen_epochs") for row in rows}
    missing = sorted(key for key in SCREEN_ROWS if not epochs.get(key))
    if missing:
        raise SystemExit(f"error: {budget}: no equal-time epochs for {', '.join(missing)} "
                         f"(run bench/training_speed.py --patch 64 --variants {','.join(SCREEN_ROWS)})")
    return {key: epochs[key] for key in SCREEN_ROWS}


def screen_lines(runs: list[dict], row_epochs: dict[str, int] | None, folds: int = 3) -> str:
    """The screen's outcome: per network, each candidate's mean Dice (the three regions, over
    its inner test cases of every fold) and, once every candidate has all ``folds``, the one
    with the highest; each row's epochs."""
    import statistics

    lines = ["", "Screen (inner test cases only; the outer test cases were never seen):"]
    for net in ("slots", "ef"):
        keys = [key for key in SCREEN_ROWS if key.startswith(f"screen-{net}-")]
        done = {key: [r for r in runs if r["method"] == key] for key in keys}
        means = {key: statistics.fmean(statistics.fmean(case[f"dice/{g}"] for g in ("TC", "WT", "ET"))
                                       for r in mine for case in r["cases"])
                 for key, mine in done.items() if mine}
        if not means:
            continue
        complete = all(len({r["fold"] for r in mine}) == folds for mine in done.values())
        verdict = f"chosen: **{max(means, key=means.get)}**" if complete else "not every candidate has all folds yet"
        lines.append(f"- {net}: " + ", ".join(f"{k} {v:.3f} ({len(done[k])} folds)" for k, v in means.items())
                     + f"; {verdict}")
    if row_epochs:
        lines.append("- epochs at equal wall time: " + ", ".join(f"{k} {v}" for k, v in row_epochs.items()))
    return "\n".join(lines) + "\n"


def link_cases(cases: Sequence[Case], folder: Path) -> Path:
    """``folder/<case id>/<file>``: a link to each file of ``cases``, so that cases from several
    folders are one data folder for training and evaluation (links already there are kept)."""
    for case in cases:
        for file in case.files:
            link = folder / case.case_id / file.name
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(file.resolve())
    return folder


def fold_settings(split_file: Path, fold: int, row: Row, out: Path, epochs: int | None,
                  settings: dict | None = None) -> dict:
    """A row's settings on one fold: ``settings`` (``--set``), then the fold's split and the row's network."""
    own = {"data.split": str(split_file.resolve()), "data.fold": fold, "network.fusion": row.fusion,
           "network.sequence_dropout": row.sequence_dropout, **({"data.partial": True} if row.partial else {}),
           **dict(row.ablation), **candidate_settings(row.candidate)}
    if row.init:
        own["init"] = str(pretrain(out, row.init, row.candidate).resolve())
    return {**(settings or {}), **own, **({"optim.epochs": epochs} if epochs else {})}


def pretrain(out: Path, network: str, candidate: str = "") -> Path:
    """OUT/phantom-pretrain-<network>[-<candidate>]: the phantom-only network (trained once, then
    reused), built as the screen's ``candidate`` when one is named."""
    import subprocess
    import sys

    run = out / (f"{PRETRAINED}-{network}" + (f"-{candidate}" if candidate else ""))
    if not (run / "summary.json").exists():
        cli = [str(Path(sys.executable).with_name("brats-cggm"))]
        if not (out / "phantoms").is_dir():
            subprocess.run([*cli, "phantom", "--out", str(out / "phantoms"), *PHANTOMS], check=True)
        subprocess.run([*cli, "train", "--data", str(out / "phantoms"), "--out", str(run), *PRETRAIN_RECIPE,
                        *pretrain_options(network, candidate)], check=True)
    return run


def prepare(folders: Sequence[Path], out: Path, folds: int) -> tuple[Path, list[str]]:
    """OUT/cases (every labelled full case of ``folders``, linked) and OUT/split.json (its folds
    by source); the case ids. A rerun whose cases or folds changed is refused: its runs would not
    be comparable."""
    cases = labelled_cases(folders)
    split = source_folds([c.case_id for c in cases], folds)
    split_file = out / "split.json"
    if split_file.exists() and json.loads(split_file.read_text())["folds"] != split["folds"]:
        raise SystemExit(f"error: {split_file}: made for other cases or folds; use another --out")
    save_split(split, split_file)
    partial = partial_cases(folders)
    if partial:
        save_split(with_partial(split, [c.case_id for c in partial]), out / "split-partial.json")
        link_cases([*cases, *partial], out / "cases-partial")
    return link_cases(cases, out / "cases"), [c.case_id for c in cases]


def run_rows(data: Path, out: Path, rows: Sequence[str], folds: int, epochs: int | None, seeds: int = 1,
             settings: dict | None = None, kept: Path | None = None,
             row_epochs: dict[str, int] | None = None) -> None:
    """Train (or reuse) every row x fold x seed at a fixed budget, and score it on its test fold;
    a row x fold whose every seed is already kept in ``kept`` (committed) is not trained again.
    ``row_epochs``: a row's own epochs (the screen's equal wall time) over ``epochs``. A screen
    row trains on the inner split and is scored with all sequences only (16 times fewer
    inferences)."""
    from brats_cggm.compare import compare

    for key in rows:  # row by row over the folds: each finished row is complete
        row, screen = ROWS[key], key in SCREEN_ROWS
        split_file = out / (INNER_SPLIT if screen else "split.json")
        for fold in range(folds):
            if kept is not None and all((kept / f"{key}-fold{fold}-seed{s}.json").exists() for s in range(seeds)):
                continue
            if row.fusion is None:
                model = pretrain(out, row.init) if row.method == PRETRAINED else Path(row.method)
                score_model(model, data, split_file, fold, out / key / f"fold{fold}.json")
                continue
            if row.partial and not (out / "split-partial.json").exists():
                raise SystemExit(f"error: row {key} trains on the cases that lack sequences; --data has none")
            if row.partial and reused_fold(out, key, fold, seeds, kept) is not None:
                continue
            row_data, row_split = (data.parent / "cases-partial", out / "split-partial.json") if row.partial \
                else (data, split_file)
            compare(row_data, [row.method], seeds, out / row.group / f"fold{fold}", preset=PRESET,
                    settings=fold_settings(row_split, fold, row, out, (row_epochs or {}).get(key, epochs), settings),
                    subsets=not screen, checkpoint=CHECKPOINT)


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
    scored, summary, _ = evaluate_cases(Segmenter.load(model), cases, out.with_suffix(""), {"model": str(model)},
                                        subsets=True)
    dice = {r: summary["metrics"][f"dice/{r}"]["mean"] for r in REGIONS}
    nan = math.nan
    row = {"method": str(model), "seed": 0, "best_epoch": 0, "test_cases": len(cases), "cases": scored,
           **{f"test_dice/{r}": v for r, v in dice.items()}, "test_dice/mean": statistics.fmean(dice.values()),
           "val_dice/mean": nan, **{f"head/{m}": nan for m in MODALITIES},
           "step_s": nan, "train_s": nan, **subset_columns(summary["subsets"])}
    atomic_write_text(out, json.dumps(row, indent=1) + "\n")


def collect(out: Path, rows: Sequence[str], folds: int, kept: Path, seeds: int = 1) -> list[dict]:
    """The scored run of every row x fold x seed that has finished, labelled with its row key and
    fold, each also kept (with its per-case rows) as ``kept/<row>-fold<k>-seed<s>.json``, the small
    file to commit; a run whose folder is gone (another machine) is read back from that file."""
    from brats_cggm.compare import score_run, write_scores

    runs = []
    for key, fold, seed in ((k, f, s) for k in rows for f in range(folds) for s in range(seeds)):
        row, kept_file = ROWS[key], kept / f"{key}-fold{fold}-seed{seed}.json"
        run_dir = out / row.group / f"fold{fold}" / "runs" / f"{row.method}-seed{seed}"
        scored_model = out / key / f"fold{fold}.json"
        if row.fusion is None and seed == 0 and scored_model.exists():
            run = json.loads(scored_model.read_text())
        elif row.fusion is not None and (run_dir / "summary.json").exists():
            screen = key in SCREEN_ROWS  # scored with all sequences only, and no fit check
            run = {**score_run(run_dir, row.method, seed, None, "cpu", print, not screen, CHECKPOINT),
                   **telemetry_means(run_dir), **({} if screen else fit_check(run_dir))}
        elif kept_file.exists():
            runs.append(json.loads(kept_file.read_text()))
            continue
        elif row.partial and (reused := reused_fold(out, key, fold, seeds, kept)) is not None:
            run = {**json.loads(reused[seed].read_text()), "reused_from": row.same_as}
        else:
            continue
        runs.append({**run, "method": key, "fold": fold})
        write_scores(kept_file, runs[-1])
    return runs


def reused_fold(out: Path, key: str, fold: int, seeds: int, kept: Path | None) -> list[Path] | None:
    """The kept files of ``ROWS[key].same_as`` on ``fold`` (one per seed) when the fold gains no
    case that lacks sequences, so that the partial row's run there would be the very same run;
    ``None`` otherwise (or when they are not all kept yet)."""
    row = ROWS[key]
    if kept is None or row.same_as is None:
        return None
    with_partial_fold = json.loads((out / "split-partial.json").read_text())["folds"][fold]
    without = json.loads((out / "split.json").read_text())["folds"][fold]
    if with_partial_fold["train"] != without["train"]:
        return None
    files = [kept / f"{row.same_as}-fold{fold}-seed{s}.json" for s in range(seeds)]
    return files if all(f.exists() for f in files) else None


def fit_check(run_dir: Path) -> dict[str, float]:
    """``fit/dice/<region>``: the run's mean Dice on the cases it trained on (the scored checkpoint;
    ``RUN/evaluation/train``). A network that cannot segment its own training cases has a problem
    that no test case should be needed to reveal (the four-branch regions' collapse was one)."""
    from brats_cggm.evaluation import evaluate
    from brats_cggm.metrics import REGIONS

    summary_file = run_dir / "evaluation" / "train" / "summary.json"
    if not summary_file.exists() or Path(json.loads(summary_file.read_text())["checkpoint"]).stem != CHECKPOINT:
        evaluate(run_dir, None, "train", CHECKPOINT)
    metrics = json.loads(summary_file.read_text())["metrics"]
    return {f"fit/dice/{r}": metrics[f"dice/{r}"]["mean"] for r in REGIONS}


def fit_lines(runs: list[dict]) -> list[str]:
    """The fit check's table: per row, Dice on its runs' own training cases (mean ± std over runs)."""
    from multimodal_general.runs.series import mean_std, plus_minus

    checked = [r for r in runs if "fit/dice/WT" in r]
    if not checked:
        return []
    lines = ["", ("Fit check: Dice on each run's own training cases (its scored checkpoint), mean ± std over runs; "
                  "far below the test Dice, or TC and ET near WT's volume, means the network cannot fit the regions."),
             "", "| configuration | fit TC | fit WT | fit ET |", "|---|---|---|---|"]
    for key in dict.fromkeys(r["method"] for r in checked):
        mine = [r for r in checked if r["method"] == key]
        cells = [plus_minus(mean_std([r[f"fit/dice/{g}"] for r in mine])) for g in ("TC", "WT", "ET")]
        lines.append(f"| {ROWS[key].label} | " + " | ".join(cells) + " |")
    return lines


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


def table_markdown(table: list[dict], runs: list[dict], folds: int, cases: Sequence[str], command: str,
                   paired: dict, reference: str) -> str:
    """The table's Markdown: the protocol, mean ± std per row, the paired differences to the reference."""
    from brats_cggm.compare import SUBSET_KEYS, paired_markdown
    from multimodal_general.runs.series import plus_minus

    regions = ("WT", "TC", "ET")
    lines = [
        (f"Cross-validation on every labelled case with all four sequences given ({len(cases)}: "
         f"{', '.join(cases)}), {folds} folds by source (no institution in two folds), `cpu-real` preset for every "
         "row (2 mm, 64^3 patches, AdamW 1e-3). **Fixed budget, no checkpoint selection**: each run's last "
         "checkpoint is scored (its one validation case is only watched), once, on its test fold, on each case's "
         "1 mm grid. Mean ± std over runs (`runs` = folds x seeds done). 15-subset = Dice averaged over the 15 "
         "non-empty subsets of the sequences (the others switched off; early fusion gets zero channels); worst = "
         "mean Dice of the regions of the worst subset; head = each sequence's auxiliary head alone (validation, "
         "mean of regions); s/step = median seconds per optimizer step (2 patches, with the heads)."),
        "", f"Command: `{command}`", "",
        ("| configuration | runs | WT | TC | ET | 15-subset WT | 15-subset TC | 15-subset ET | worst subset "
         "| head FLAIR | head T1 | head T1ce | head T2 | s/step |"),
        "|---" * 14 + "|",
    ]
    for row in table:
        cells = [plus_minus(row[f"test_dice/{r}"]) for r in regions]
        unscored = (math.nan, math.nan)  # rows scored without the subsets (the screen)
        cells += [plus_minus(row.get(f"subsets_dice/{r}", unscored)) for r in regions]
        cells.append(plus_minus(row.get(SUBSET_KEYS[-1], unscored)))
        cells += [plus_minus(row[f"head/{m}"]) for m in MODALITIES]
        cells.append(f"{row['step_s'][0]:.2f}")
        lines.append(f"| {ROWS[row['method']].label} | {row['runs']} | " + " | ".join(cells) + " |")
    worst = sorted({f"{ROWS[r['method']].label}, fold {r['fold']}: {r['worst_subset']}" for r in runs
                    if "worst_subset" in r})
    lines += ["", "Worst subset of each run: " + "; ".join(worst or ["not scored"]) + ".", "",
              (f"Intervals over {len(cases)} cases are wide: they are what these cases can tell, not narrowed by "
               "choice; a second seed for rows that decide something (`--seeds 2`)."), "",
              paired_markdown(paired, reference, lambda key: ROWS[key].label).rstrip()]
    return "\n".join(lines + fit_lines(runs) + telemetry_lines(runs)) + "\n"


#: issue 24's gate for a four-branch default: against the best other row, each region's paired
#: 95 % lower bound at least this, and the 15-subset average's paired interval above zero
GATE_LOWER = -0.02


def gate_lines(runs: list[dict], candidate: str, rows: Sequence[str]) -> list[str]:
    """Whether ``candidate`` meets the gate against the best other row of ``rows`` (the highest
    mean Dice of the three regions with all sequences; screen rows aside), with each check's figures."""
    from brats_cggm.compare import aggregate, paired_rows
    from multimodal_general.experiments.paired import interval_cell

    others = [key for key in rows if key != candidate and key not in SCREEN_ROWS
              and any(run["method"] == key for run in runs)]
    if not others or not any(run["method"] == candidate for run in runs):
        return ["", f"Gate: {candidate} and another row must both be scored."]
    means = {row["method"]: row["test_dice/mean"][0] for row in aggregate(runs, others)}
    best = max(others, key=means.get)
    paired = paired_rows(runs, [candidate], best)[candidate]
    checks = [(f"{region}: lower bound ≥ {GATE_LOWER}", paired[f"dice/{region}"],
               paired[f"dice/{region}"]["low"] >= GATE_LOWER) for region in ("WT", "TC", "ET")]
    subsets = paired.get("subsets_dice/mean")
    checks.append(("15-subset average (mean of the regions): interval above 0", subsets,
                   bool(subsets and subsets["n"] and subsets["low"] > 0)))
    lines = ["", (f"Gate for {ROWS[candidate].label} as the default, against the best other row ({ROWS[best].label}, "
                  f"mean Dice of the three regions {means[best]:.3f}), paired case by case: "
                  + ("**met**" if all(ok for *_, ok in checks) else "**not met**")), ""]
    lines += [f"- {name}: {interval_cell(d) if d and d['n'] else 'not scored'} — {'met' if ok else 'not met'}"
              for name, d, ok in checks]
    return lines


def write_table(runs: list[dict], rows: Sequence[str], folds: int, results: Path, command: str,
                reference: str, cases: Sequence[str], name: str = "real_cv") -> str:
    """NAME.md|csv|json|png: per row, mean ± std over the runs done and the paired per-case
    difference to the ``reference`` row."""
    from brats_cggm.compare import aggregate, flat_paired, paired_rows, plot, plot_paired
    from multimodal_general.experiments.harness import results_csv
    from multimodal_general.io import json_safe
    from multimodal_general.runs.provenance import provenance

    done = [r for r in rows if any(run["method"] == r for run in runs)]
    table = aggregate(runs, done)
    paired = paired_rows(runs, done, reference)
    markdown = table_markdown(table, runs, folds, cases, command, paired, reference)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{name}.md", markdown)
    atomic_write_text(results / f"{name}.csv", results_csv([{**r, **flat_paired(paired.get(r["method"], {}))}
                                                            for r in table]))
    atomic_write_text(results / f"{name}.json", json.dumps(
        json_safe({"command": command, "provenance": provenance("torch", "monai"), "checkpoint": CHECKPOINT,
                   "cases": list(cases), "reference": reference, "rows": table, "paired": paired, "runs": runs}),
        indent=1, default=str) + "\n")
    plot(results / f"{name}.png", table, unit="runs")
    if paired:
        plot_paired(results / f"{name}_paired.png", paired, reference, lambda key: ROWS[key].label)
    return markdown


def card_summary(out: Path, key: str, folds: int, command: str) -> dict:
    """What a model card says about a row's recipe on cases it never saw: per metric (Dice, HD95
    and their lesion-wise forms, per region) the mean over every test case of the folds with its
    bootstrap 95 % interval (``estimate``), and the 15-subset table (Dice, mean over the folds)."""
    from brats_cggm.compare import read_cases
    from brats_cggm.metrics import REGIONS
    from multimodal_general.experiments.paired import mean_interval

    row = ROWS[key]
    tables, cases = [], []
    for fold in range(folds):
        test = out / row.group / f"fold{fold}" / "runs" / f"{row.method}-seed0" / "evaluation" / "test"
        if (test / "summary.json").exists():
            tables.append(json.loads((test / "summary.json").read_text()))
            cases += read_cases(test / "cases.csv")
    if not tables:
        raise SystemExit(f"error: no fold of row {key} is done")

    def over_folds(values: list[float]) -> float:
        return round(sum(values) / len(values), 4)

    metrics = [f"{kind}/{r}" for kind in ("dice", "hd95", "lesion_dice", "lesion_hd95") for r in REGIONS]
    estimate = {m: {k: round(v, 4) if isinstance(v, float) else v
                    for k, v in mean_interval({c["case_id"]: c[m] for c in cases}).items()} for m in metrics}
    subsets = {name: {r: over_folds([t["subsets"]["subsets"][name][f"dice/{r}"] for t in tables]) for r in REGIONS}
               for name in tables[0]["subsets"]["subsets"]}
    average = {r: over_folds([v[r] for v in subsets.values()]) for r in REGIONS}
    worst = min(subsets, key=lambda name: sum(subsets[name].values()))
    return {"what": f"the recipe ({row.label}), cross-validated by source on real BraTS cases: each case scored "
                    "once, by the fold's network that never trained on it nor was selected on it (last checkpoint "
                    "of a fixed budget); estimate = mean over the cases [bootstrap 95 % interval]",
            "command": command, "folds": len(tables), "test_cases": len(cases),
            "estimate": estimate, "dice": {r: estimate[f"dice/{r}"]["mean"] for r in REGIONS},
            "subsets": subsets, "subset_average": average, "worst_subset": {"subset": worst, **subsets[worst]}}


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """The command line, checked: the options and the rows to run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="folders of BraTS cases, or a parent of several (every labelled full case is used)")
    parser.add_argument("--out", type=Path, default=Path("runs/real_cv_paired"))
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--rows", help=f"comma-separated, from {', '.join(ROWS)} (default: {','.join(DEFAULT_ROWS)}; "
                        "with --screen every screen-* row)")
    parser.add_argument("--reference", help=f"the row every other is compared to, case by case (default: {REFERENCE}; "
                        "with --screen screen-slots-c1)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row and fold (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the preset's)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every run, e.g. --set validation.every=50 (repeatable)")
    parser.add_argument("--table-only", action="store_true", help="write the table from the runs that are done")
    parser.add_argument("--gate", metavar="ROW", help="also say whether ROW meets issue 24's gate for the default "
                        "against the best other of --rows")
    parser.add_argument("--card", metavar="ROW", help="also write RESULTS/real_cv_card.json, the row's figures for a "
                        "model card (brats-cggm export --evaluation)")
    parser.add_argument("--screen", action="store_true",
                        help="issue 24's candidate screen: the screen-* rows on each outer fold's training cases "
                             "only (OUT/split-inner.json), at equal wall time (--budget); RESULTS/real_cv_screen.*")
    parser.add_argument("--budget", type=Path, default=Path("bench/results/training_speed_screen.json"),
                        help="bench/training_speed.py's JSON of the screen-* variants: each row's epochs")
    args = parser.parse_args()
    args.rows = args.rows or ",".join(SCREEN_ROWS if args.screen else DEFAULT_ROWS)
    args.reference = args.reference or ("screen-slots-c1" if args.screen else REFERENCE)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    if args.gate and args.gate not in rows:
        parser.error(f"--gate {args.gate} is not one of the rows ({', '.join(rows)})")
    if args.reference not in rows:
        parser.error(f"--reference {args.reference} is not one of the rows ({', '.join(rows)})")
    if any((key in SCREEN_ROWS) != args.screen for key in rows):
        parser.error("the screen-* rows run with --screen, and --screen runs only them")
    return args, rows


def main() -> None:
    args, rows = parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    missing = [str(d) for d in args.data if not d.is_dir()]
    if missing:
        raise SystemExit(f"error: {missing[0]}: no such folder of BraTS cases")
    data, cases = prepare(args.data, args.out, args.folds)
    name, row_epochs = "real_cv", None
    candidates = any(ROWS[key].candidate for key in rows)  # rows at a screen candidate's network and budget
    if args.screen:
        name = "real_cv_screen"
        save_split(inner_split(json.loads((args.out / "split.json").read_text())), args.out / INNER_SPLIT)
        row_epochs = None if args.epochs or args.table_only else screen_epochs(args.budget)
    elif candidates and not (args.epochs or args.table_only):
        budget = screen_epochs(args.budget)  # a chosen candidate trains for its equal-wall-time epochs
        row_epochs = {key: budget[ROWS[key].screen_row] for key in rows if ROWS[key].candidate}
    kept = args.results / f"{name}_runs"
    if not args.table_only:
        for key in rows:  # each row is scored and kept as soon as it is trained
            run_rows(data, args.out, [key], args.folds, args.epochs, args.seeds, parse_settings(args.settings),
                     kept, row_epochs)
            collect(args.out, [key], args.folds, kept, args.seeds)
    command = (f"python bench/real_cv.py --data DATA --rows {','.join(rows)} --reference {args.reference} "
               f"--folds {args.folds} --seeds {args.seeds}" + (f" --epochs {args.epochs}" if args.epochs else "")
               + (" --screen" if args.screen else "")
               + (f" --budget {args.budget}" if args.screen or candidates else "")
               + (f" --gate {args.gate}" if args.gate else "") + "".join(f" --set {item}" for item in args.settings))
    runs = collect(args.out, rows, args.folds, kept, args.seeds)
    markdown = write_table(runs, rows, args.folds, args.results, command, args.reference, cases, name)
    if args.screen:
        markdown += screen_lines(runs, row_epochs)
    if args.gate:
        markdown += "\n".join(gate_lines(runs, args.gate, rows)) + "\n"
    if args.screen or args.gate:
        atomic_write_text(args.results / f"{name}.md", markdown)
    print(markdown)
    if args.card:
        card = card_summary(args.out, args.card, args.folds, command)
        atomic_write_text(args.results / "real_cv_card.json", json.dumps(card, indent=1) + "\n")


if __name__ == "__main__":
    main()
