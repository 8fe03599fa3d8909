"""How large is CGGM's direction term against the task, in the gradient the network gets?

For CGGM runs (``RUN/checkpoints/<checkpoint>.pt``), on training patches of the run's own
training cases, with the network and balancer state of the checkpoint (or, ``--fresh``, of a
network as it starts), it measures the gradient of the task loss and of ``lam * L_gm`` over the
network's parameters, per part (the four encoders, fusion + decoder, the fused output
convolution): their norms, the ratio of the two, and the cosine between them. ``L_gm`` is the
one the run used (for the ``gradients`` presets a cosine of gradients, differentiated twice).

    python bench/direction_term.py runs/real_cv_paired/slots-dropout/fold0/runs/cggm-deficit-seed0 \\
        --batches 4 --out bench/results/direction_term.md

Why: without ``L_gm`` the deficit rule trained like joint training; with it, it lost WT and ET
on every case (docs/real_data.md). A cosine's gradient scales with one over the norm of the
gradient it is taken of, so as the task's gradient shrinks the direction term need not.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch


def parts_of(net: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The network's parameters by part: each encoder, the fused output convolution, the rest."""
    encoders = {name: list(branch.parameters()) for name, branch in net.branches.items()}
    output = list(net.output_conv.parameters())
    taken = {id(p) for group in (*encoders.values(), output) for p in group}
    rest = [p for p in net.parameters() if id(p) not in taken]
    return {**{f"encoder {name}": params for name, params in encoders.items()},
            "fusion + decoder": rest, "output convolution": output}


def measure(run_dir: Path, checkpoint: str, batches: int, fresh: bool, seed: int = 0,
            lam: float | None = None) -> list[dict]:
    """Per part: the norms of the task's and the direction term's gradients and their cosine,
    over ``batches`` training batches as the run drew them (``optim.batch_size`` cases, each
    its ``num_samples`` patches): each batch its own gradient, the batches' gradients taken
    together as one vector. ``lam`` replaces the run's."""
    from monai.utils import set_determinism

    from brats_cggm.data.layouts import discover
    from brats_cggm.data.transforms import case_to_dict, train_transforms
    from brats_cggm.training.components import build_components
    from brats_cggm.training.trained import load_run
    from brats_cggm.training.trainer import FeatureNet

    run = load_run(run_dir, checkpoint)
    config = run.config
    if config.balancer.name != "cggm":
        raise SystemExit(f"error: {run_dir}: balancer {config.balancer.name}, not cggm")
    if lam is not None:
        config.balancer = dataclasses.replace(config.balancer, lam=lam)
    torch.manual_seed(seed)
    parts = build_components(config, 1, torch.device("cpu"))
    modules = run.payload["modules"]
    if not fresh:
        parts.net.load_state_dict(modules["net"])
    parts.balancer.load_state_dict(modules["balancer"])  # B and the EMAs as the run ended (a fresh run has none yet)
    parts.net.sequence_dropout = 0.0  # every sequence on: every encoder has a gradient
    model, balancer = FeatureNet(parts.net), parts.balancer
    named = parts_of(parts.net)
    cases = [c for c in discover(config.data.dir, config.data.layout).cases if c.case_id in set(run.fold["train"])]
    set_determinism(seed)  # the same patches at every call
    chain = train_transforms(config.preprocessing)
    size = config.optim.batch_size
    task_sq, gm_sq, dot = ({k: 0.0 for k in named} for _ in range(3))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        picks = torch.randperm(len(cases), generator=generator)[:size].tolist()
        samples = [patch for i in picks for patch in chain(case_to_dict(cases[i]))]
        image = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
        label = torch.stack([torch.as_tensor(s["label"]) for s in samples]).float()
        output, features = model(image)
        task = parts.criterion(output, label)
        balancer._micro_batches = 0  # a measurement, not a step: no modulate() between batches
        # the heads' losses are on detached features: over the network's parameters this is lam * L_gm
        direction = balancer.extra_loss(features, output, label, task)
        params = [p for group in named.values() for p in group]
        g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
        g_gm = torch.autograd.grad(direction, params, allow_unused=True)
        index = 0
        for key, group in named.items():
            for _ in group:
                a = g_task[index] if g_task[index] is not None else torch.zeros(())
                b = g_gm[index] if g_gm[index] is not None else torch.zeros(())
                task_sq[key] += float((a * a).sum())
                gm_sq[key] += float((b * b).sum())
                dot[key] += float((a * b).sum()) if a.dim() and b.dim() else 0.0
                index += 1
    rows = []
    for key in named:
        t, g = math.sqrt(task_sq[key]), math.sqrt(gm_sq[key])
        rows.append({"part": key, "task": t, "direction": g, "ratio": g / t if t else math.nan,
                     "cos": dot[key] / (t * g) if t and g else math.nan})
    return rows


def table(label: str, rows: Sequence[dict]) -> list[str]:
    lines = [f"**{label}**", "", "| part | ‖∇ task‖ | ‖∇ lam·L_gm‖ | ratio | cos |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['task']:.3g} | {r['direction']:.3g} | {r['ratio']:.3g} | {r['cos']:+.2f} |")
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="CGGM run folders")
    parser.add_argument("--checkpoint", default="last", choices=("best", "last"))
    parser.add_argument("--batches", type=int, default=4, help="batches of training patches per measurement")
    parser.add_argument("--out", type=Path, help="write the tables here (markdown) as well")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [f"```\npython bench/direction_term.py {' '.join(map(str, args.runs))} --batches {args.batches}\n```", ""]
    from multimodal_general.errors import UserError

    for run_dir in args.runs:
        for fresh in (True, False):
            label = f"{run_dir.name} ({run_dir.resolve().parents[1].name}): " + (
                "at initialisation (run's final B)" if fresh else f"checkpoint {args.checkpoint}")
            try:
                rows = measure(run_dir, args.checkpoint, args.batches, fresh)
            except UserError as error:
                raise SystemExit(f"error: {error}") from None
            lines += table(label, rows)
    text = "\n".join(lines)
    print(text)
    if args.out:
        from multimodal_general.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
