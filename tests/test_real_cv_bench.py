"""bench/real_cv.py: folds by source, the rows, the cases it finds, and a tiny protocol run on phantoms."""

import importlib.util
import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest

from brats_cggm import models
from brats_cggm.compare import CGGM_VARIANTS, METHODS
from brats_cggm.network.fusion import FUSIONS

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_cv", REPO / "bench" / "real_cv.py")
real_cv = sys.modules["real_cv"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(real_cv)

#: made-up ids in BraTS 2018's form: six sources of 3, 3, 2, 2, 1, 1 cases
CASES = [f"Brats18_{source}_{i}_1" for source, n in
         [("CBICA", 3), ("TCIA01", 3), ("TCIA02", 2), ("2013", 2), ("TCIA03", 1), ("TCIA10", 1)] for i in range(n)]


def test_the_source_is_read_from_the_case_id():
    assert real_cv.source_of("Brats18_TCIA01_201_1") == "TCIA01"
    assert real_cv.source_of("Brats18_2013_7_1") == "2013"
    assert real_cv.source_of("BraTS2021_00012") == "BraTS2021_00012"  # another form: its own source
    assert real_cv.source_of("brats_2013_pat0001_1") == "2013"  # BraTS 2015's copy of a 2013 case


def test_cases_that_lack_sequences_train_only_in_folds_that_do_not_test_their_source():
    split = real_cv.source_folds(CASES, 3)
    partial = ["brats_2013_pat0001_1", "brats_2013_pat0002_1"]
    extended = real_cv.with_partial(split, partial)
    for fold, more in zip(split["folds"], extended["folds"]):
        assert more["test"] == fold["test"] and more["val"] == fold["val"]  # the same cases are scored
        tests_2013 = "2013" in {real_cv.source_of(c) for c in fold["test"]}
        assert more["train"] == sorted(fold["train"] + ([] if tests_2013 else partial))
    assert sum(set(partial) <= set(f["train"]) for f in extended["folds"]) == 2


def test_folds_split_by_source_and_every_case_is_tested_once():
    folds = real_cv.source_folds(CASES, 3)["folds"]
    tested = [c for fold in folds for c in fold["test"]]
    assert sorted(tested) == sorted(CASES)
    for a, b in itertools.combinations(folds, 2):
        assert not {real_cv.source_of(c) for c in a["test"]} & {real_cv.source_of(c) for c in b["test"]}
    assert sorted(len(f["test"]) for f in folds) == [4, 4, 4]  # largest source first, to the emptiest fold
    for fold in folds:
        rest = sorted(set(CASES) - set(fold["test"]))
        assert fold["val"] == rest[:1] and fold["train"] == rest[1:]


def test_more_folds_than_sources_is_refused():
    with pytest.raises(SystemExit, match="2 source"):
        real_cv.source_folds(["Brats18_A_1_1", "Brats18_B_1_1"], 3)


def test_every_row_is_a_method_that_exists_and_rows_share_runs_only_when_identical():
    trained = {key: row for key, row in real_cv.ROWS.items() if row.fusion is not None}
    for row in trained.values():
        assert row.method in {**METHODS, **CGGM_VARIANTS} and row.fusion in FUSIONS
        assert row.init is None or row.init in real_cv.PRETRAIN
    runs = [(row.group, row.method) for row in trained.values()]
    assert len(runs) == len(set(runs))  # no two rows write the same run folder
    for row in real_cv.ROWS.values():
        if row.fusion is None:  # a scored model: a shipped model or a phantom pre-training
            assert (row.method in {m.name for m in models.available()}
                    or (row.method == real_cv.PRETRAINED and row.init in real_cv.PRETRAIN)), row.method


def phantom_folders(root):
    """A parent of three data folders: two labelled cases, two cases with images only (BraTS 2023
    names) and, in partial/, a case with two sequences."""
    from brats_cggm.data.phantom import write_phantoms

    write_phantoms(root / "labelled", 2, size=16, seed=0)
    write_phantoms(root / "images_only", 2, size=16, layout="brats2023", seed=1)
    for seg in (root / "images_only").rglob("*-seg.nii.gz"):
        seg.unlink()
    write_phantoms(root / "scratch", 3, size=16, seed=2)
    (root / "scratch" / "BraTS2021_00002").rename(root / "partial")
    for name in ("t1", "t2"):
        (root / "partial" / f"BraTS2021_00002_{name}.nii.gz").unlink()
    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        for file in (root / "scratch" / case).iterdir():
            file.unlink()
        (root / "scratch" / case).rmdir()
    (root / "scratch").rmdir()


def test_every_labelled_full_case_is_found_under_a_parent_and_linked_into_one_folder(tmp_path):
    from brats_cggm.data.layouts import discover

    phantom_folders(tmp_path / "real")
    cases = real_cv.labelled_cases([tmp_path / "real"])
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"]  # not partial/ nor images only
    linked = real_cv.link_cases(cases, tmp_path / "cases")
    found = discover(linked)
    assert [c.case_id for c in found.cases] == ["BraTS2021_00000", "BraTS2021_00001"] and not found.problems
    assert all(c.label is not None for c in found.cases)
    with pytest.raises(SystemExit, match="both in"):
        real_cv.labelled_cases([tmp_path / "real", tmp_path / "real" / "labelled"])
    with pytest.raises(SystemExit, match="no labelled case"):
        real_cv.labelled_cases([tmp_path / "real" / "partial"])
    assert [c.case_id for c in real_cv.partial_cases([tmp_path / "real"])] == ["BraTS2021_00002"]


def test_the_default_rows_are_the_protocol_s_and_the_reference_is_the_shipped_recipe():
    assert real_cv.REFERENCE in real_cv.DEFAULT_ROWS and set(real_cv.DEFAULT_ROWS) <= set(real_cv.ROWS)
    assert {real_cv.ROWS[k].method for k in real_cv.DEFAULT_ROWS} == {"early_fusion", "early_fusion_dropout"}
    assert real_cv.ROWS[real_cv.REFERENCE].init == "early_fusion" and real_cv.CHECKPOINT == "last"


def check_inference_choices(out, results, card):
    """bench/inference_choices.py on the tiny protocol's folds: every variant per case, the plain
    one as the protocol scored it, and the card figures of a chosen variant."""
    spec = importlib.util.spec_from_file_location("inference_choices", REPO / "bench" / "inference_choices.py")
    choices = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choices)
    rows = choices.run_folds(out, "ef", 1, results / "inference_choices_runs")  # fold 0: two cases
    variants = {r["variant"] for r in rows}
    assert variants == {choices.variant_name(t, c) for t in (False, True) for c in choices.CANDIDATES}
    assert len(rows) == 2 * len(variants) and {"plain", "tta", "tta+wt-far"} <= variants
    plain = {r["case_id"]: r["dice/WT"] for r in rows if r["variant"] == "plain"}
    protocol = {c["case_id"]: c["dice/WT"] for c in json.loads(
        (results / "real_cv_runs" / "ef-fold0-seed0.json").read_text())["cases"]}
    assert plain == pytest.approx(protocol, abs=1e-6)  # plain is the protocol's own score
    text = choices.write_table(rows, "ef", results, "cmd")
    assert "Paired against plain" in text and (results / "inference_choices.png").exists()
    (results / "real_cv_card.json").write_text(json.dumps(card))
    figures = choices.card_figures(rows, "tta+wt-far", results / "real_cv_card.json")
    assert figures["estimate"] == card["estimate"] and figures["inference"]["tta"] is True
    assert figures["inference"]["postprocessing"] == choices.CANDIDATES["wt-far"]
    assert figures["inference"]["estimate"]["dice/WT"]["n"] == 2


def test_a_tiny_protocol_run_keeps_per_case_rows_pairs_rows_and_resumes(tmp_path, monkeypatch):
    from training_cases import TINY, torch_threads

    from brats_cggm.data.phantom import write_phantoms
    from brats_cggm.training import Trainer

    write_phantoms(tmp_path / "data", 4, size=24, seed=0)
    out, results, rows = tmp_path / "out", tmp_path / "results", ["ef", "ef-dropout"]
    settings = {k: v for k, v in TINY.items() if k != "data.val_fraction"}
    with torch_threads(1):
        data, cases = real_cv.prepare([tmp_path / "data"], out, 2)
        real_cv.run_rows(data, out, rows, 2, 1, settings=settings)
        runs = real_cv.collect(out, rows, 2, results / "real_cv_runs")
        markdown = real_cv.write_table(runs, rows, 2, results, "cmd", "ef", cases)
        monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
        real_cv.run_rows(data, out, rows, 2, 1, settings=settings)
    assert sorted(p.name for p in (results / "real_cv_runs").iterdir()) == sorted([
        f"{row}-fold{k}-seed0.json" for row in rows for k in (0, 1)])
    kept = json.loads((results / "real_cv_runs" / "ef-fold0-seed0.json").read_text())
    assert kept["checkpoint"] == "last" and len(kept["cases"]) == 2 and "hd95/WT" in kept["cases"][0]
    assert 0 <= kept["fit/dice/ET"] <= 1 and "Fit check: Dice on each run's own training cases" in markdown
    tested = sorted(c["case_id"] for r in runs if r["method"] == "ef" for c in r["cases"])
    assert tested == sorted(cases)  # every case tested once
    payload = json.loads((results / "real_cv.json").read_text())
    assert payload["reference"] == "ef" and payload["paired"]["ef-dropout"]["dice/WT"]["n"] == 4
    assert "Paired against early fusion (4-channel U-Net)" in markdown and "Intervals over 4 cases are wide" in markdown
    assert "Fixed budget, no checkpoint selection" in markdown
    assert "vs_ref/dice/ET_mean" in (results / "real_cv.csv").read_text()
    assert (results / "real_cv_paired.png").read_bytes().startswith(b"\x89PNG")
    card = real_cv.card_summary(out, "ef", 2, "cmd")
    assert card["test_cases"] == 4 and card["estimate"]["dice/WT"]["n"] == 4 and len(card["subsets"]) == 15
    dice = [c["dice/WT"] for r in runs if r["method"] == "ef" for c in r["cases"]]
    assert card["dice"]["WT"] == pytest.approx(sum(dice) / 4, abs=1e-4)
    assert card["estimate"]["dice/WT"]["low"] <= card["dice"]["WT"] <= card["estimate"]["dice/WT"]["high"]
    check_inference_choices(out, results, card)
    # the screen scores its rows without the subsets: the table holds dashes there
    from brats_cggm.compare import SUBSET_KEYS

    bare = [{k: v for k, v in r.items() if k not in SUBSET_KEYS and k != "worst_subset"} for r in runs]
    screen_table = real_cv.write_table(bare, rows, 2, tmp_path / "screen", "cmd", "ef", cases, "real_cv_screen")
    assert "Worst subset of each run: not scored." in screen_table and (tmp_path / "screen" / "real_cv_screen.md").exists()
    shutil.rmtree(out)  # another machine: the table again from the kept files alone
    assert real_cv.collect(out, rows, 2, results / "real_cv_runs") == json.loads(json.dumps(runs))


def test_an_ablation_row_trains_in_a_folder_of_its_own_with_its_settings(tmp_path):
    from brats_cggm.training.config import resolve_config

    row, base = real_cv.ROWS["slots-cggm-deficit-dropout-nodir"], real_cv.ROWS["slots-cggm-deficit-dropout"]
    assert row.method == base.method and row.group != base.group
    settings = real_cv.fold_settings(tmp_path / "split.json", 0, row, tmp_path, None)
    config = resolve_config("cpu-real", None, {**settings, "balancer.name": "cggm", "balancer.preset": "deficit"})
    assert config.balancer.lam == 0 and config.network.fusion == "slots"
    assert "balancer.lam" not in real_cv.fold_settings(tmp_path / "split.json", 0, base, tmp_path, None)
    lr_row = real_cv.ROWS["slots-cggm-deficit-dropout-lr"]
    settings = real_cv.fold_settings(tmp_path / "split.json", 0, lr_row, tmp_path, None)
    config = resolve_config("cpu-real", None, {**settings, "balancer.name": "cggm", "balancer.preset": "deficit"})
    assert config.balancer.options == {"scale_by": "learning_rate"} and config.balancer.lam == 0
    assert len({row.group for row in (row, base, lr_row)}) == 3


def test_a_partial_row_reuses_the_run_of_a_fold_that_gains_no_partial_case(tmp_path):
    split = real_cv.source_folds(CASES, 3)
    (tmp_path / "split.json").write_text(json.dumps(split))
    (tmp_path / "split-partial.json").write_text(json.dumps(real_cv.with_partial(split, ["brats_2013_pat0001_1"])))
    kept = tmp_path / "kept"
    kept.mkdir()
    row = real_cv.ROWS["slots-dropout-partial"]
    for fold in range(3):
        (kept / f"{row.same_as}-fold{fold}-seed0.json").write_text("{}")
    tested_2013 = [k for k, f in enumerate(split["folds"]) if "2013" in {real_cv.source_of(c) for c in f["test"]}]
    for fold in range(3):
        reused = real_cv.reused_fold(tmp_path, "slots-dropout-partial", fold, 1, kept)
        assert (reused is not None) == (fold in tested_2013), fold
    assert real_cv.reused_fold(tmp_path, "slots-dropout-partial", tested_2013[0], 2, kept) is None  # seed 1 not kept


# ------------------------------------------------------------------ the candidate screen (issue 24, 2c)
def test_the_screen_splits_each_outer_fold_s_training_cases_only():
    outer = real_cv.source_folds(CASES, 3)
    inner = real_cv.inner_split(outer)
    for fold, screen in zip(outer["folds"], inner["folds"]):
        seen = set(screen["train"]) | set(screen["val"]) | set(screen["test"])
        assert seen == set(fold["train"]) | set(fold["val"])  # every outer training case, and no outer test case
        assert screen["test"] and screen["train"]
        sources = {real_cv.source_of(c) for c in screen["test"]}
        assert not sources & {real_cv.source_of(c) for c in screen["train"] + screen["val"]}


def test_the_screen_rows_are_the_speed_benchmark_s_candidates():
    """The networks and patches real_cv trains (through compare's method overrides) are those
    bench/training_speed.py times for the budget."""
    from brats_cggm.compare import method_overrides
    from brats_cggm.training.components import network_from_config
    from brats_cggm.training.config import resolve_config

    spec = importlib.util.spec_from_file_location("training_speed", REPO / "bench" / "training_speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    assert list(real_cv.SCREEN_ROWS) == list(speed.SCREEN)
    for key, row in real_cv.SCREEN_ROWS.items():
        shared = {"network.fusion": row.fusion, **dict(row.ablation)}
        config = resolve_config("cpu-real", None, method_overrides(row.method, shared, "cpu-real"))
        net, timed = network_from_config(config.network), speed.build(key, 64)
        assert type(net) is type(timed.net) and net.channels == timed.net.channels, key
        assert net.strides == timed.net.strides and not config.network.heads, key
        assert list(config.preprocessing.patch_size) == [speed.variant_patch(key, 64)] * 3, key
        assert config.network.sequence_dropout == 0.25 and config.balancer.name == "none", key


def test_the_screen_trains_each_row_on_the_inner_split_for_its_equal_time_epochs(tmp_path, monkeypatch):
    import brats_cggm.compare

    split = real_cv.source_folds(CASES, 3)
    (tmp_path / "split.json").write_text(json.dumps(split))
    (tmp_path / real_cv.INNER_SPLIT).write_text(json.dumps(real_cv.inner_split(split)))
    calls = []
    monkeypatch.setattr(brats_cggm.compare, "compare",
                        lambda data, methods, seeds, out, **options: calls.append((methods, out, options["settings"]))
                        if not options["subsets"] else pytest.fail("the screen scores no subsets"))
    rows, epochs = ["screen-slots-c2", "screen-ef-c4"], {"screen-slots-c2": 40, "screen-ef-c4": 120}
    real_cv.run_rows(tmp_path / "cases", tmp_path, rows, 3, None, row_epochs=epochs)
    assert [(methods, out.relative_to(tmp_path).as_posix()) for methods, out, _ in calls] == [
        (["modality_dropout"], f"slots-screen-c2/fold{k}") for k in range(3)] + [
        (["early_fusion_dropout"], f"mean-screen-c4/fold{k}") for k in range(3)]
    for (methods, _, settings), key in zip(calls, [r for r in rows for _ in range(3)]):
        assert settings["data.split"] == str((tmp_path / real_cv.INNER_SPLIT).resolve())
        assert settings["optim.epochs"] == epochs[key] and settings["network.heads"] is False

    budget = tmp_path / "speed.json"
    budget.write_text(json.dumps({"rows": [{"variant": k, "screen_epochs": 100 + i}
                                           for i, k in enumerate(real_cv.SCREEN_ROWS)]}))
    assert real_cv.screen_epochs(budget)["screen-ef-c4"] == 107
    budget.write_text(json.dumps({"rows": [{"variant": "screen-slots-c1", "screen_epochs": 150}]}))
    with pytest.raises(SystemExit, match="no equal-time epochs for screen-ef-c1"):
        real_cv.screen_epochs(budget)


def test_a_candidate_row_trains_the_chosen_network_from_a_pre_training_built_the_same(tmp_path, monkeypatch):
    import subprocess

    from brats_cggm.compare import method_overrides
    from brats_cggm.training.config import resolve_config
    from multimodal_general.cli_support import parse_settings

    runs = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: runs.append(cmd))
    (tmp_path / "phantoms").mkdir()
    row = real_cv.ROWS["slots-c3-cggm-deficit-lr-partial-init"]
    settings = real_cv.fold_settings(tmp_path / "split.json", 0, row, tmp_path, None)
    assert settings["init"] == str((tmp_path / "phantom-pretrain-slots-c3").resolve())
    network = dict(real_cv.CANDIDATES["c3"])["network.overrides"]
    config = resolve_config("cpu-real", None, method_overrides("cggm-deficit", settings, "cpu-real"))
    assert config.network.overrides == network and config.balancer.lam == 0 and config.network.fusion == "slots"
    # the pre-training is the same network (no heads), so its weights load into the row's
    sets = [item for item in runs[-1][runs[-1].index("--set"):] if item != "--set"]
    pretraining = resolve_config("cpu-real", None, parse_settings(sets))
    assert pretraining.network.fusion == "slots" and pretraining.network.heads is False
    assert pretraining.network.overrides == network
    # early fusion's candidate: the widths compare derives for it, in its pre-training too
    options = real_cv.pretrain_options("early_fusion", "c3")
    assert json.loads(options[-1].split("=", 1)[1])["channels"] == network["channels"]
    assert row.group != real_cv.ROWS["slots-cggm-deficit-lr-partial-init"].group and row.screen_row == "screen-slots-c3"
    assert real_cv.ROWS["slots-c3-dropout-partial-init"].screen_row == "screen-slots-c3"
    assert real_cv.widths("slots-c3-cggm-deficit-lr-partial-init") == "8-16-32-64-128"
    assert real_cv.widths("slots-cggm-paper-dropout") == "8-16-32-64"  # the preset's (the card's description)
    ef = real_cv.ROWS["ef-c2-dropout-init"]
    settings = real_cv.fold_settings(tmp_path / "split.json", 0, ef, tmp_path, None)
    assert ef.screen_row == "screen-ef-c2" and settings["init"] == str((tmp_path / "phantom-pretrain-early_fusion-c2").resolve())
    widths = method_overrides("early_fusion_dropout", settings, "cpu-real")["network.overrides"]
    assert json.loads(runs[-1][-1].split("=", 1)[1]) == widths and widths["channels"] == [16, 32, 64, 128]


def test_the_screen_chooses_a_candidate_only_once_every_candidate_has_every_fold():
    def run(key, fold, dice):
        return {"method": key, "fold": fold, "cases": [{"dice/TC": dice, "dice/WT": dice, "dice/ET": dice}]}

    runs = [run("screen-slots-c1", f, 0.5) for f in range(3)] + [run("screen-slots-c2", 0, 0.9)]
    assert "not every candidate has all folds yet" in real_cv.screen_lines(runs, None)
    runs += [run(f"screen-slots-c{c}", f, 0.1 * c) for c in (2, 3, 4) for f in range(3) if (c, f) != (2, 0)]
    lines = real_cv.screen_lines(runs, {"screen-slots-c1": 150})
    # c2: (0.9 + 0.2 + 0.2) / 3 over its cases; c1 0.5 is the highest
    assert "screen-slots-c2 0.433 (3 folds)" in lines and "chosen: **screen-slots-c1**" in lines
    assert "- ef:" not in lines and "screen-slots-c1 150" in lines


def test_a_screen_run_is_scored_with_all_sequences_only_and_without_a_fit_check(tmp_path, monkeypatch):
    import brats_cggm.compare

    row = real_cv.ROWS["screen-ef-c2"]
    run_dir = tmp_path / row.group / "fold0" / "runs" / f"{row.method}-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "telemetry.csv").write_text("step,epoch,loss\n1,1,0.5\n")  # joint training: no CGGM columns
    asked = []
    monkeypatch.setattr(brats_cggm.compare, "score_run", lambda run, method, seed, test, device, report, subsets, ckpt:
                        asked.append(subsets) or {"method": method, "cases": []})
    monkeypatch.setattr(real_cv, "fit_check", lambda run: pytest.fail("the screen has no fit check"))
    runs = real_cv.collect(tmp_path, ["screen-ef-c2"], 1, tmp_path / "kept")
    assert asked == [False] and [r["method"] for r in runs] == ["screen-ef-c2"]
    assert (tmp_path / "kept" / "screen-ef-c2-fold0-seed0.json").exists()


def test_the_gate_pairs_the_candidate_with_the_best_other_row_and_needs_every_check():
    """Known answers from the committed kept rows: the best four-branch row misses the gate on
    TC, ET and the 15-subset average; the reference shifted up by 0.05 on every case meets it."""
    kept = REPO / "bench" / "results" / "real_cv_runs"
    rows = ["ef", "ef-dropout-init", "slots-dropout-partial-init"]
    runs = [json.loads((kept / f"{key}-fold{fold}-seed0.json").read_text()) for key in rows for fold in range(3)]
    lines = real_cv.gate_lines(runs, "slots-dropout-partial-init", rows)
    assert "against the best other row (phantom pre-training, then early fusion" in lines[1]
    assert "**not met**" in lines[1] and sum(line.endswith("— not met") for line in lines) == 4

    def shifted(run: dict, by: float) -> dict:
        def up(values: dict) -> dict:
            return {k: v + by if k.startswith(("dice/", "subsets_dice/")) else v for k, v in values.items()}
        return {**up(run), "method": "slots-dropout", "cases": [up(case) for case in run["cases"]]}

    better = [shifted(run, 0.05) for run in runs if run["method"] == "ef-dropout-init"]
    lines = real_cv.gate_lines(runs + better, "slots-dropout", [*rows, "slots-dropout"])
    assert "**met**" in lines[1] and sum(line.endswith("— met") for line in lines) == 4
    assert "+0.050 [+0.050, +0.050]" in lines[3]
    # a candidate 0.03 below on every case misses every region (lower bound < -0.02)
    worse = [shifted(run, -0.03) for run in runs if run["method"] == "ef-dropout-init"]
    assert "**not met**" in real_cv.gate_lines(runs + worse, "slots-dropout", [*rows, "slots-dropout"])[1]
