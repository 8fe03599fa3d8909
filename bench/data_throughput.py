"""Does data loading limit a training step? Cached loader throughput next to a stand-in
forward/backward of the same patch size, measured side by side in one run::

    python bench/data_throughput.py                          # 5 cases 240x240x155, patches 128^3 and 96^3
    python bench/data_throughput.py --size 120,120,80 --patches 64 --cases 2 --steps 2   # quick

It writes phantom cases once (``brats_cggm.data.phantom``, BraTS 2021 layout); for every
patch size it fills a memory cache (:func:`make_dataset`,
timed), then for each ``--workers`` value measures, back to back:

* **loader**: patches/s of :func:`make_loader` over the training chain, alone (after a
  warm-up epoch that also starts the workers);
* **train**: patches/s of a stand-in step (MONAI ``UNet`` 4 -> 3 channels,
  16-32-64-128, strides 2-2-2; Dice loss, Adam) on a fixed batch of the same shape, from
  the fastest of ``--steps`` steps (the one least slowed by other processes: the loader
  rate is an average, so the ratio errs against the loader);
* **ratio** = loader / train (> 1: loading alone outpaces training);
* **fed step**: the same step fed by the loader (median), and the share of the time spent
  waiting for the next batch (loader and network share the same cores here).

The table goes to stdout; everything, with versions and the command line, to ``--out``
(JSON, written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from rich.console import Console
from rich.table import Table

from brats_cggm import MODALITIES
from brats_cggm.data.dataset import make_dataset, make_loader
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.transforms import PreprocessConfig, train_transforms
from multimodal_general.io import atomic_write_text
from multimodal_general.runs.provenance import provenance

REPO = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5, help="synthetic cases (default 5)")
    parser.add_argument("--size", default="240,240,155", help="volume size in voxels (default 240,240,155)")
    parser.add_argument("--patches", default="128,96", help="cubic patch sizes (default 128,96)")
    parser.add_argument("--workers", default="0,2", help="loader worker counts (default 0,2)")
    parser.add_argument("--num-samples", type=int, default=2,
                        help="patches per case visit = training batch (default 2)")
    parser.add_argument("--epochs", type=int, default=3, help="timed loader epochs after the warm-up (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per measurement (default 5)")
    parser.add_argument("--device", default="cpu", help="device of the stand-in network (default cpu)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_throughput.json")
    args = parser.parse_args(argv)
    args.size, args.patches, args.workers = tuple(_ints(args.size)), _ints(args.patches), _ints(args.workers)
    if len(args.size) != 3:
        parser.error("--size takes three integers")
    return args


# ------------------------------------------------------------------------- network
def network(device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = UNet(spatial_dims=3, in_channels=len(MODALITIES), out_channels=3,
               channels=(16, 32, 64, 128), strides=(2, 2, 2)).to(device)
    return net, torch.optim.Adam(net.parameters(), 1e-4)


def train_step(net, optimizer, loss_fn, image: torch.Tensor, label: torch.Tensor, device: torch.device) -> None:
    image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    loss_fn(net(image), label).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_rate(loader, epochs: int) -> float:
    """Patches per second over ``epochs`` full passes, after one warm-up pass."""
    for _ in loader:
        pass
    patches, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            patches += batch["image"].shape[0]
    return patches / (time.perf_counter() - start)


def step_times(net, optimizer, loss_fn, batches, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds waiting for each batch and seconds of each training step, after two warm-up
    steps (the first steps allocate and tune)."""
    waits, times = [], []
    for index in range(steps + 2):
        start = time.perf_counter()
        batch = next(batches)
        ready = time.perf_counter()
        train_step(net, optimizer, loss_fn, batch["image"], batch["label"], device)
        if index >= 2:
            waits.append(ready - start)
            times.append(time.perf_counter() - ready)
    return waits, times


def _forever(loader):
    while True:
        yield from loader


def measure(args: argparse.Namespace, root: Path, console: Console) -> list[dict]:
    """One row per patch size and worker count; the loader, the step on a fixed batch and
    the fed step of a row are measured back to back, so that they share the machine's
    load of that moment."""
    device = torch.device(args.device)
    cases = discover(root, "brats2021").cases
    rows = []
    for patch in args.patches:
        # the phantom's own voxel size (1 mm at the default 240x240x155): no resampling
        spacing = tuple(fov / n for fov, n in zip((240.0, 240.0, 155.0), args.size))
        cfg = PreprocessConfig(spacing=spacing, patch_size=(patch,) * 3, num_samples=args.num_samples)
        start = time.perf_counter()
        dataset = make_dataset(cases, train_transforms(cfg), cache="memory", num_workers=os.cpu_count())
        fill_s = time.perf_counter() - start
        cropped = [tuple(item["image"].shape[1:]) for item in dataset._cache]
        net, optimizer = network(device)
        loss_fn = DiceLoss(sigmoid=True)
        fixed = next(iter(make_loader(dataset, shuffle=False)))
        for workers in args.workers:
            console.log(f"patch {patch}^3, {workers} worker(s)")
            loader = make_loader(dataset, batch_size=1, shuffle=True, num_workers=workers)
            rate = loader_rate(loader, args.epochs)
            _, alone = step_times(net, optimizer, loss_fn, _repeat(fixed), args.steps, device)
            waits, fed = step_times(net, optimizer, loss_fn, _forever(loader), args.steps, device)
            train = args.num_samples / min(alone)
            rows.append({
                "patch": patch, "workers": workers, "batch": args.num_samples, "cache_fill_s": fill_s,
                "cropped_shapes": cropped, "loader_patches_per_s": rate, "train_patches_per_s": train,
                "ratio": rate / train, "step_s": alone, "fed_step_s": fed, "fed_wait_s": waits,
                "fed_data_wait": sum(waits) / (sum(waits) + sum(fed)),
            })
            del loader
        del dataset
    return rows


def _repeat(batch):
    while True:
        yield batch


# --------------------------------------------------------------------------- report
def table(rows: list[dict], args: argparse.Namespace) -> Table:
    size = "x".join(map(str, args.size))
    out = Table(title=f"Cached loader vs stand-in training step ({args.cases} cases {size}, "
                      f"batch {args.num_samples} patches, {args.device})")
    for name in ("patch", "workers", "cache fill s", "loader patch/s", "train patch/s",
                 "ratio", "best step s", "fed step s", "data wait"):
        out.add_column(name, justify="right")
    for r in rows:
        out.add_row(f"{r['patch']}^3", str(r["workers"]), f"{r['cache_fill_s']:.1f}",
                    f"{r['loader_patches_per_s']:.2f}", f"{r['train_patches_per_s']:.2f}",
                    f"{r['ratio']:.1f}", f"{min(r['step_s']):.2f}",
                    f"{statistics.median(r['fed_step_s']):.2f}", f"{100 * r['fed_data_wait']:.1f}%")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(Console().width, 120))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="brats-throughput-") as tmp:
        start = time.perf_counter()
        write_phantoms(Path(tmp), args.cases, args.size, layout="brats2021", seed=0)
        console.log(f"wrote {args.cases} cases in {time.perf_counter() - start:.1f} s")
        rows = measure(args, Path(tmp), console)
    console.print(table(rows, args))
    payload = {
        **provenance("monai", "nibabel"),
        "load_average_before": load_before,
        "device": args.device,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
