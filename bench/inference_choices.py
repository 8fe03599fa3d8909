"""Clean-up and mirroring (TTA), chosen by the protocol of bench/real_cv.py.

Each fold's network of a protocol row (its last checkpoint: a fixed budget, as the table
scores it) predicts its fold's test cases twice, plain and averaged over the 8 mirrorings;
every clean-up candidate below (declared before any result was seen) is applied to both
label maps, and each of the resulting variants is scored per case on the case's own grid
(Dice, HD95 and their BraTS 2023 lesion-wise forms, per region) and paired case by case
against the plain prediction (no mirroring, no clean-up), with bootstrap 95 % intervals.
Seconds per case are those of this machine (2 cores), network and clean-up included.

Each fold's per-case rows are kept in ``RESULTS/inference_choices_runs/<row>-fold<k>.json``
(commit them: ``--table-only`` rebuilds the table from them); the table goes to
``RESULTS/inference_choices.md|json`` and ``inference_choices.png``. ``--card VARIANT`` adds that
variant's per-metric estimate (mean over the cases, bootstrap 95 % interval) to the recipe's
figures in ``RESULTS/real_cv_card.json`` for the model card.

    python bench/inference_choices.py --protocol runs/real_cv_paired --row ef-dropout-init
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from real_cv import CHECKPOINT, REFERENCE, ROWS

from brats_cggm.metrics import REGIONS
from multimodal_general.io import atomic_write_text

#: the clean-up candidates (postprocessing sections, docs/inference.md): far or small
#: whole-tumour islands (the false positives users see: cerebellum, ventricle borders),
#: islands smaller than a tenth of the largest, small islands of every region, and the
#: small-enhancement relabel BraTS entries use (no labelled case here has an empty ET: it
#: can only cost)
CANDIDATES: dict[str, dict] = {
    "none": {},
    "wt-far": {"WT": {"min_ml": 0.5, "max_distance_mm": 20}},
    "wt-largest": {"WT": {"min_fraction_of_largest": 0.1}},
    "small-islands": {"WT": {"min_ml": 0.5}, "TC": {"min_ml": 0.1}, "ET": {"min_ml": 0.05}},
    "et-relabel": {"small_et_ml": 0.5},
}
#: the variant every other is paired against
PLAIN = "plain"


def variant_name(tta: bool, candidate: str) -> str:
    name = ("tta" if tta else "") + ("" if candidate == "none" else ("+" if tta else "") + candidate)
    return name or PLAIN


def score_fold(run_dir: Path, data: Path, test: set[str]) -> list[dict]:
    """Per variant and test case: the metrics and the seconds (one row each, ``variant`` and ``case_id``)."""
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    from brats_cggm.data.layouts import discover
    from brats_cggm.data.validation import load_sequences
    from brats_cggm.evaluation import reference_regions
    from brats_cggm.inference.postprocessing import Postprocessing
    from brats_cggm.inference.segmenter import Segmenter
    from brats_cggm.lesion_metrics import lesion_metrics
    from brats_cggm.metrics import region_metrics

    import torch

    segmenter = Segmenter.load(run_dir, checkpoint=CHECKPOINT, postprocessing="off", tta=False)
    to_regions = ConvertToMultiChannelBasedOnBratsClasses()
    rows = []
    for case in (c for c in discover(data).cases if c.case_id in test):
        volumes, (reference, spacing) = load_sequences(case), reference_regions(case)
        first = next(iter(volumes.values()))
        for tta in (False, True):
            start = time.perf_counter()
            prediction = segmenter.predict_arrays({m: v.data for m, v in volumes.items()}, first.affine, case.case_id,
                                                  first.header, tta=tta)
            network_s = time.perf_counter() - start
            for candidate, section in CANDIDATES.items():
                start = time.perf_counter()
                labels = Postprocessing.from_dict(section)(prediction.labels, first.affine)[0] if section else prediction.labels
                cleanup_s = time.perf_counter() - start
                regions = torch.as_tensor(to_regions(labels))
                rows.append({"variant": variant_name(tta, candidate), "case_id": case.case_id,
                             **region_metrics(regions, reference, spacing, hd95=True),
                             **lesion_metrics(regions, reference, spacing), "seconds": network_s + cleanup_s})
    return rows


def run_folds(protocol: Path, row: str, folds: int, kept: Path) -> list[dict]:
    """Every fold's rows: scored (once; kept in ``kept``) where the fold's run has finished."""
    split = json.loads((protocol / "split.json").read_text())
    spec, rows = ROWS[row], []
    for fold in range(folds):
        kept_file = kept / f"{row}-fold{fold}.json"
        run_dir = protocol / spec.group / f"fold{fold}" / "runs" / f"{spec.method}-seed0"
        if not kept_file.exists() and (run_dir / "summary.json").exists():
            scored = score_fold(run_dir, protocol / "cases", set(split["folds"][fold]["test"]))
            kept.mkdir(parents=True, exist_ok=True)
            atomic_write_text(kept_file, json.dumps({"row": row, "fold": fold, "rows": scored}, indent=1) + "\n")
        if kept_file.exists():
            rows += [{**r, "fold": fold} for r in json.loads(kept_file.read_text())["rows"]]
    return rows


def write_table(rows: list[dict], row: str, results: Path, command: str) -> str:
    """inference_choices.md|json|png: per variant the means, the paired differences to plain."""
    from brats_cggm.compare import paired_markdown, paired_rows, plot_paired
    from multimodal_general.experiments.harness import markdown_table

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    runs = [{"method": v, "cases": [{k: x for k, x in r.items() if k not in ("variant", "fold", "seconds")}
                                    for r in rows if r["variant"] == v]} for v in variants]
    paired = paired_rows(runs, variants, PLAIN)
    metrics = [f"{kind}/{region}" for kind in ("dice", "hd95", "lesion_dice", "lesion_hd95") for region in REGIONS]

    def mean(variant: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["variant"] == variant)

    table = [[v, *(f"{mean(v, m):.3f}" if "dice" in m else f"{mean(v, m):.1f}" for m in metrics),
              f"{mean(v, 'seconds'):.1f}"] for v in variants]
    cases = len({r["case_id"] for r in rows})
    text = "\n".join([
        (f"Clean-up and mirroring on the protocol's folds ({cases} test cases, {ROWS[row].label}, each fold's last "
         "checkpoint), every variant scored per case on the case's own grid: mean Dice / HD95 (mm) and their BraTS "
         "2023 lesion-wise forms (reference lesions dilated 3 voxels to match, lesions under 50 mm^3 ignored, an "
         "unmatched lesion scores Dice 0 and HD95 374 mm); s/case = network + clean-up on this machine (2 cores). "
         f"`tta` = the 8 mirrorings averaged; candidates: {json.dumps(CANDIDATES)}."), "",
        f"Command: `{command}`", "",
        markdown_table(["variant", *metrics, "s/case"], table), "",
        paired_markdown(paired, PLAIN).rstrip(), ""])
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "inference_choices.md", text)
    atomic_write_text(results / "inference_choices.json", json.dumps(
        {"command": command, "row": row, "candidates": CANDIDATES, "paired": paired, "rows": rows}, indent=1) + "\n")
    if paired:
        plot_paired(results / "inference_choices.png", paired, PLAIN)
    return text


def card_figures(rows: list[dict], variant: str, card_file: Path) -> dict:
    """``card_file`` (bench/real_cv.py --card's figures of the recipe) with ``inference`` added: the
    variant's estimate per metric, the mean over the test cases with its bootstrap 95 % interval,
    and its seconds per case (what a user of a model with that clean-up and mirroring should expect)."""
    from multimodal_general.experiments.paired import mean_interval

    mine = [r for r in rows if r["variant"] == variant]
    if not mine:
        raise SystemExit(f"error: no variant {variant!r} (the variants: {', '.join(dict.fromkeys(r['variant'] for r in rows))})")
    metrics = [k for k in mine[0] if "/" in k]
    estimate = {m: {k: round(v, 4) if isinstance(v, float) else v
                    for k, v in mean_interval({r["case_id"]: r[m] for r in mine}).items()} for m in metrics}
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    tta, _, candidate = variant.partition("+") if variant.startswith("tta") else ("", "", variant)
    return {**card, "inference": {
        "variant": variant, "tta": bool(tta), "postprocessing": CANDIDATES.get(candidate, {}),
        "what": ("each case scored by its fold's network with this mirroring and clean-up: mean over the cases "
                 "[bootstrap 95 % interval]"),
        "estimate": estimate, "seconds_per_case": round(statistics.fmean(r["seconds"] for r in mine), 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", type=Path, default=Path("runs/real_cv_paired"),
                        help="bench/real_cv.py's --out (its runs, split.json and cases)")
    parser.add_argument("--row", default=REFERENCE, choices=[k for k, r in ROWS.items() if r.fusion])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--table-only", action="store_true", help="the table from the kept rows only")
    parser.add_argument("--card", metavar="VARIANT", help="add the variant's figures to RESULTS/real_cv_card.json "
                        "(bench/real_cv.py --card writes it), for the model card (brats-cggm export --evaluation)")
    args = parser.parse_args()
    kept = args.results / "inference_choices_runs"
    if args.table_only:
        rows = [{**r, "fold": f["fold"]} for path in sorted(kept.glob(f"{args.row}-fold*.json"))
                for f in [json.loads(path.read_text())] for r in f["rows"]]
    else:
        if not (args.protocol / "split.json").exists():
            raise SystemExit(f"error: {args.protocol}: no protocol there (run bench/real_cv.py --out {args.protocol})")
        rows = run_folds(args.protocol, args.row, args.folds, kept)
    if not rows:
        raise SystemExit(f"error: no fold of row {args.row} is done")
    print(write_table(rows, args.row, args.results, f"python bench/inference_choices.py --row {args.row}"))
    if args.card:
        card_file = args.results / "real_cv_card.json"
        atomic_write_text(card_file, json.dumps(card_figures(rows, args.card, card_file), indent=1) + "\n")


if __name__ == "__main__":
    main()
