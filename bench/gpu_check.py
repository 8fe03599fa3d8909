"""The GPU check's measurements, run by ``bench/gpu_check.sh`` once the environment is
installed (see that script and docs/gpu_check.md)::

    python bench/gpu_check.py --out runs/gpu_check              # on a machine with an NVIDIA GPU
    python bench/gpu_check.py --out runs/gpu_check_dry --dry-run  # every step on the CPU, tiny sizes

Steps, each timed, its figures written to ``OUT/gpu_check.json`` as soon as it ends (a
failed step is recorded with its one-line error, and the steps that need it are skipped);
the phantoms, runs and model go to ``OUT/work/``, emptied first:

1. ``environment``: versions, the GPU, ONNX Runtime's providers (on a GPU both torch's CUDA
   and ONNX Runtime's ``CUDAExecutionProvider`` must be there, or the check stops here);
2. ``phantoms``: training phantoms and one inference case (240 x 240 x 155 at 1 mm);
3. ``train_none``, ``train_cggm``: the ``gpu`` training preset (1 mm, 128^3 patches, the
   ``default`` network) for a few epochs with mixed precision (``optim.amp on``: bfloat16
   where the GPU has it), with the balancers ``none`` and ``cggm``: every epoch's loss
   (finite), s/step (the first epoch includes cuDNN's autotuning and the data cache), peak
   GPU memory (``torch.cuda.max_memory_allocated``), the validation Dice (meaningless
   after a few epochs: it shows that validation ran);
4. ``export``: the ``cggm`` run to ONNX with its model card (``export_run``, as
   ``brats-cggm export``), with torch/ONNX parity;
5. ``infer_onnxruntime``, ``infer_torch``: the inference case end to end through
   ``Segmenter.predict_case`` (read the NIfTI files, preprocess, sliding window with
   Gaussian blending, inversion to the input grid, labels), ONNX Runtime on its CUDA
   provider and torch on the GPU: one warm-up call (cuDNN's algorithm search), then
   ``--rounds`` timed calls; the median next to the anchor (MONAI's BraTS bundle: 395-592
   ms end to end on an A100), and how many voxels' labels the two backends share.

``--dry-run`` runs every step on the CPU (torch on the CPU, ONNX Runtime's CPU provider),
with 3 phantoms of 40^3, a 48 x 48 x 40 inference case, the ``small`` network at 3 mm
with 32^3 patches, 1 epoch, 1 round. Exit status: 0 when every step passed, 1 when one
failed, 2 for bad options or a machine without what the check needs (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

#: MONAI's BraTS MRI segmentation bundle (SegResNet), end to end on an A100, in ms
ANCHOR = {"what": "MONAI brats_mri_segmentation bundle, end-to-end inference on an A100", "ms": [395, 592]}
BALANCERS = ("none", "cggm")
EXPORTED = "cggm"  # the run that is exported and timed


@dataclass(frozen=True)
class Sizes:
    device: str  # torch's
    provider: str  # ONNX Runtime's
    train_cases: int
    train_size: tuple[int, int, int]
    case_size: tuple[int, int, int]
    epochs: int
    rounds: int
    overrides: dict[str, Any]


GPU = Sizes("cuda", "cuda", 5, (240, 240, 155), (240, 240, 155), epochs=3, rounds=3, overrides={})
DRY_RUN = Sizes("cpu", "cpu", 3, (40, 40, 40), (48, 48, 40), epochs=1, rounds=1, overrides={
    "network.preset": "small", "preprocess.spacing": [3.0, 3.0, 3.0], "preprocess.patch_size": [32, 32, 32],
    # three levels, not four: every step's code runs, and the export (most of the dry run) takes half as long
    "network.overrides": {"channels": [4, 8, 8], "strides": [2, 2, 2], "num_res_units": 1, "head_channels": 2},
    "data.num_workers": 0, "validation.sw_batch_size": 1, "validation.hd95": False,
})


class CheckFailed(Exception):
    """A step found the machine unfit (one line)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, the phantoms, runs and model")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    parser.add_argument("--epochs", type=int, help="training epochs per balancer (default: 3; dry run 1)")
    parser.add_argument("--rounds", type=int, help="timed inference calls per backend (default: 3; dry run 1)")
    parser.add_argument("--install-seconds", type=float, help="the installation's time, for the report")
    args = parser.parse_args(argv)
    for name in ("epochs", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    return args


# ------------------------------------------------------------------------- steps

def environment(sizes: Sizes) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    if hasattr(ort, "preload_dlls") and sizes.provider == "cuda":
        ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels (torch's)
    found = {
        "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "onnxruntime_build": ort.get_build_info() if hasattr(ort, "get_build_info") else None,
    }
    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed(f"torch {torch.__version__} sees no CUDA GPU (torch.version.cuda = {torch.version.cuda})")
    if sizes.provider == "cuda" and "CUDAExecutionProvider" not in found["onnxruntime_providers"]:
        raise CheckFailed(f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider "
                          f"({', '.join(found['onnxruntime_providers'])}): is onnxruntime (CPU) installed beside onnxruntime-gpu?")
    return found


def phantoms(out: Path, sizes: Sizes) -> dict[str, Any]:
    from brats_cggm.data.phantom import write_phantoms

    write_phantoms(out / "phantoms" / "train", sizes.train_cases, size=sizes.train_size, seed=0)
    write_phantoms(out / "phantoms" / "case", 1, size=sizes.case_size, seed=1)
    return {"train_cases": sizes.train_cases, "train_size": list(sizes.train_size), "case_size": list(sizes.case_size)}


def train(out: Path, sizes: Sizes, balancer: str, epochs: int) -> dict[str, Any]:
    import torch

    from brats_cggm.training import Trainer, resolve_config, start, stop

    run = out / "runs" / balancer
    config = resolve_config("gpu", overrides={
        "data.dir": str(out / "phantoms" / "train"), "balancer.name": balancer, "optim.epochs": epochs,
        "optim.amp": "on", "validation.every": epochs, "device": sizes.device, **sizes.overrides,
    })
    place = start(config.device)
    cuda = place.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer = Trainer(config, run, place, report=lambda line: print(f"  [{balancer}] {line}", flush=True))
        summary = trainer.fit()
    finally:
        stop()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train_loss"] for row in rows]
    steady = [row["step_s"] for row in rows[1:]] or [rows[0]["step_s"]]
    result = {
        "balancer": balancer, "epochs": len(rows), "steps": summary["steps"],
        "patch_size": list(config.preprocessing.patch_size), "spacing": list(config.preprocessing.spacing),
        "network": config.network.preset, "amp_dtype": str(trainer.amp_dtype).replace("torch.", ""),
        "loss": losses, "loss_finite": all(math.isfinite(v) for v in losses),
        "step_s": [row["step_s"] for row in rows], "step_s_after_first_epoch": statistics.median(steady),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "val_dice_mean": summary["final"].get("val_dice/mean"),
    }
    if not result["loss_finite"]:
        raise CheckFailed(f"{balancer}: a non-finite training loss {losses}")
    return result


def export(out: Path) -> dict[str, Any]:
    from brats_cggm.export import export_run

    card = export_run(out / "runs" / EXPORTED, out / "model.onnx", "best", 1, "gpu_check: a few epochs on phantoms")
    return {"file": "model.onnx", "mib": round((out / "model.onnx").stat().st_size / 2**20, 2),
            "parity_max_abs_diff_probabilities": card["parity"]["max_abs_diff_probabilities"]}


def infer(out: Path, sizes: Sizes, backend: str, rounds: int, labels: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from brats_cggm.data.layouts import discover
    from brats_cggm.inference.segmenter import Segmenter

    case = discover(out / "phantoms" / "case").cases[0]
    if backend == "onnxruntime":
        segmenter = Segmenter.load(out / "model.onnx", provider=sizes.provider)
        providers = segmenter.backend.session.get_providers()
        if sizes.provider == "cuda" and providers[0] != "CUDAExecutionProvider":
            raise CheckFailed(f"ONNX Runtime fell back to {providers[0]} (CUDA or cuDNN libraries not found)")
        where = providers[0]
    else:
        segmenter = Segmenter.load(out / "runs" / EXPORTED, device=sizes.device)
        where = f"torch on {sizes.device}"
    cuda = sizes.device == "cuda"
    started = time.perf_counter()
    segmenter.predict_case(case)  # warm-up: cuDNN's algorithm search, ONNX Runtime's arena
    warmup = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        prediction = segmenter.predict_case(case)
        seconds.append(time.perf_counter() - started)
    labels[backend] = prediction.labels
    median_ms = statistics.median(seconds) * 1000
    result = {
        "backend": backend, "runs_on": where, "chain": getattr(segmenter, "chain", "monai"), "case_shape": list(prediction.shape), "windows_per_batch": segmenter.windowing.sw_batch_size,
        "patch_size": list(segmenter.windowing.patch_size), "overlap": segmenter.windowing.overlap, "warmup_s": round(warmup, 3),
        "round_s": [round(s, 4) for s in seconds], "median_ms": round(median_ms, 1),
        "vs_anchor": round(median_ms / statistics.mean(ANCHOR["ms"]), 2),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda and backend == "torch" else None,
    }
    if len(labels) == 2:
        first, second = labels.values()
        result["labels_same_as_onnxruntime"] = float(np.mean(first == second))
    return result


# ---------------------------------------------------------------------- the run

def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    sizes = DRY_RUN if args.dry_run else GPU
    epochs, rounds = args.epochs or sizes.epochs, args.rounds or sizes.rounds
    out = args.out / "work"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report: dict[str, Any] = {"mode": "dry-run (CPU)" if args.dry_run else "gpu", "sizes": asdict(sizes) | {
        "epochs": epochs, "rounds": rounds}, "anchor": ANCHOR, "install_s": args.install_seconds, "steps": {}}
    labels: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]], tuple[str, ...]]] = [
        ("environment", lambda: environment(sizes), ()),
        ("phantoms", lambda: phantoms(out, sizes), ("environment",)),
        *[(f"train_{b}", lambda b=b: train(out, sizes, b, epochs), ("phantoms",)) for b in BALANCERS],
        ("export", lambda: export(out), (f"train_{EXPORTED}",)),
        ("infer_onnxruntime", lambda: infer(out, sizes, "onnxruntime", rounds, labels), ("export",)),
        ("infer_torch", lambda: infer(out, sizes, "torch", rounds, labels), (f"train_{EXPORTED}",)),
    ]
    started = time.perf_counter()
    for name, step, needs in steps:
        missing = [n for n in needs if report["steps"].get(n, {}).get("status") != "ok"]
        if missing:
            report["steps"][name] = {"status": "skipped", "error": f"needs {', '.join(missing)}"}
            write(args.out / "gpu_check.json", report)
            continue
        print(f"== {name}", flush=True)
        begun = time.perf_counter()
        try:
            report["steps"][name] = {"status": "ok", **step()}
        except Exception as error:  # noqa: BLE001 (recorded, and the run goes on with what it can)
            if not isinstance(error, CheckFailed):
                traceback.print_exc()
            report["steps"][name] = {"status": "failed", "error": f"{error.__class__.__name__}: {error}"}
        report["steps"][name]["took_s"] = round(time.perf_counter() - begun, 2)
        report["total_s"] = round(time.perf_counter() - started + (args.install_seconds or 0), 1)
        write(args.out / "gpu_check.json", report)
    return report


def write(path: Path, report: dict[str, Any]) -> None:
    from multimodal_general.io import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def summary_lines(report: dict[str, Any]) -> list[str]:
    steps = report["steps"]
    lines = [f"gpu_check ({report['mode']}): {report.get('total_s', 0):.0f} s in all"
             + (f", install {report['install_s']:.0f} s" if report.get("install_s") else "")]
    for name, step in steps.items():
        if step["status"] != "ok":
            lines.append(f"  {name}: {step['status'].upper()} ({step['error']})")
        elif name.startswith("train_"):
            peak = f", peak GPU {step['peak_gpu_mib']} MiB" if step["peak_gpu_mib"] is not None else ""
            lines.append(f"  {name}: loss {step['loss'][0]:.3f} -> {step['loss'][-1]:.3f} ({step['amp_dtype']}), "
                         f"{step['step_s_after_first_epoch']:.3f} s/step{peak}")
        elif name.startswith("infer_"):
            lines.append(f"  {name}: {step['median_ms']:.0f} ms end to end on {step['runs_on']} "
                         f"({step['vs_anchor']}x the anchor's mean, {ANCHOR['ms'][0]}-{ANCHOR['ms'][1]} ms on an A100)")
        else:
            lines.append(f"  {name}: ok in {step['took_s']:.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_steps(args)
    print("\n".join(summary_lines(report)))
    print(f"figures: {args.out / 'gpu_check.json'}")
    failed = [n for n, s in report["steps"].items() if s["status"] != "ok"]
    if report["steps"]["environment"]["status"] != "ok":
        print(f"gpu_check: {report['steps']['environment']['error']}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
