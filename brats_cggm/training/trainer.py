"""The training loop: patches in, balanced optimizer steps, validation, checkpoints.

The loop itself is short; the rest lives in collaborators: :mod:`.components` (network,
heads, balancer, optimizer), :mod:`.cases` (split and per-rank shards),
:mod:`.validation`, :mod:`.checkpoint`, :mod:`multimodal_general.runs.runlog` and :mod:`.plots`.

A run folder::

    RUN/config.yaml          the resolved configuration (repeat the run with --config)
    RUN/split.json           the split it used
    RUN/checkpoints/last.pt  everything needed to resume exactly (written every epoch, and on Ctrl-C)
    RUN/checkpoints/best.pt  the model of the epoch with the best mean validation Dice
    RUN/metrics.jsonl|csv    one row per epoch; RUN/telemetry.csv one row per optimizer step
    RUN/tensorboard/         the same metrics for TensorBoard
    RUN/plots/*.png          loss, validation Dice/HD95, and the balancer's coefficients
    RUN/summary.json         the outcome (best epoch and its metrics)
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from brats_cggm import MODALITIES
from brats_cggm.data.dataset import make_dataset, make_loader
from brats_cggm.data.layouts import describe_sequences
from brats_cggm.data.splits import save_split
from brats_cggm.data.transforms import train_transforms, val_transforms
from brats_cggm.errors import ConfigurationError, IncompatibleModel, UserError
from brats_cggm.metrics import REGIONS, summarize
from brats_cggm.network import MultiBranchUNet
from brats_cggm.training import checkpoint
from brats_cggm.training.cases import select_cases, shard
from brats_cggm.training.components import Components, build_components
from brats_cggm.training.config import TrainConfig
from brats_cggm.training.distributed import Place
from brats_cggm.training.mono_modal import MonoModalResponses
from brats_cggm.training.validation import validate_cases
from brats_cggm.training.validation_updates import restore_legacy_measurement, validation_of
from multimodal_general.io import atomic_write_text
from multimodal_general.runs.provenance import provenance
from multimodal_general.runs.runlog import Logbook
from multimodal_general.runs.runtime import keep_freed_memory
from multimodal_general.training.step import after_validation, balanced_step


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(UserError):
    """Ctrl-C: a checkpoint was saved and the run can be resumed."""


@dataclass
class StepResult:
    loss: float
    telemetry: dict[str, float]


class FeatureNet(nn.Module):
    """``forward`` = the network's ``forward_with_features``, so that DDP wraps the call the
    loop makes (DDP only intercepts ``forward``). With AGM's ``responses`` it also hands the
    branch pyramids over to them."""

    def __init__(self, net: nn.Module, responses: MonoModalResponses | None = None) -> None:
        super().__init__()
        self.net = net
        self.responses = responses

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor | None]]:
        """``inputs``: the image, or ``{"image", "available"}`` (a batch of cases some of which lack
        sequences). A sequence missing from any sample of the batch gets ``None`` features: the
        balancer runs no head for it and takes no term from it."""
        image, available = (inputs, None) if isinstance(inputs, Tensor) else (inputs["image"], inputs["available"])
        if self.responses is None:
            logits, features = self.net.forward_with_features(image, available)
        else:
            logits, pyramids = self.net.forward_with_pyramids(image, available)
            self.responses.remember(pyramids)
            features = self.net.features_by_name(pyramids)
        if available is not None:
            everywhere = dict(zip(MODALITIES, available.bool().all(dim=0).tolist()))
            features = {name: f if everywhere[name] else None for name, f in features.items()}
        return logits, features


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path, place: Place, resume: bool = False,
                 report: Callable[[str], None] = print, progress=None) -> None:
        self.config, self.run_dir, self.place = config, Path(run_dir), place
        self.report, self.progress = report, progress
        self.ckpt_dir = self.run_dir / "checkpoints"
        if place.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        cases = select_cases(config.data)
        self.cases = cases
        if config.data.partial:
            report(f"training cases: {describe_sequences(cases.train)}; validation: {describe_sequences(cases.val)}")
        pre = config.preprocessing
        self.train_set = make_dataset(
            shard(cases.train, place.rank, place.world_size, equal=True), train_transforms(pre),
            cache=config.data.cache, cache_dir=self.run_dir / "cache",
        )
        self.val_set = make_dataset(
            shard(cases.val, place.rank, place.world_size, equal=False), val_transforms(pre),
            cache=config.data.cache, cache_dir=self.run_dir / "cache",
        )
        self.steps_per_epoch = math.ceil(len(self.train_set) / config.optim.batch_size)
        total = self.steps_per_epoch * config.optim.epochs
        self.parts: Components = build_components(config, total, place.device)
        model: nn.Module = FeatureNet(self.parts.net, self.parts.responses)
        if place.distributed:
            ids = [place.device.index] if place.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.amp_dtype = _amp_dtype(config.optim.amp, place.device)
        self.scaler = torch.amp.GradScaler(place.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = checkpoint.Progress()
        self._interrupts, self._stop_agreed = DeferredInterrupt(), False
        if resume:
            self._resume()
        elif (self.ckpt_dir / "last.pt").exists():
            raise ConfigurationError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        elif config.init is not None:
            source = checkpoint.initialize_from(self.parts.net, config.init)
            report(f"network initialised from {source}")
        self.logbook = Logbook(self.run_dir, place.is_main, resume_step=self.state.step if resume else None,
                               resume_epoch=self.state.epoch if resume else None)
        if place.is_main and not resume:
            config.save(self.run_dir / "config.yaml")
            save_split(cases.split, self.run_dir / "split.json")

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        epochs = self.config.optim.epochs
        try:
            with self._interrupts:
                while self.state.epoch < epochs:
                    self._train_epoch()
        except KeyboardInterrupt:
            self._save_last()
            launcher = "torchrun ... $(which brats-cggm)" if self.place.distributed else "brats-cggm"
            raise Interrupted(
                f"interrupted in epoch {self.state.epoch + 1}; checkpoint saved in {self.ckpt_dir / 'last.pt'} "
                f"(resume with: {launcher} train --out {self.run_dir} --resume)"
            ) from None
        finally:
            self.logbook.close()
        return self._finish()

    def _train_epoch(self) -> None:
        epoch, started = self.state.epoch, time.perf_counter()
        # the losses and telemetry sums of the batches done before a resume
        partial = self.state.extra.setdefault("epoch", {"losses": [], "sums": {}, "counts": {}, "seconds": 0.0})
        losses: list[float] = partial["losses"]
        sums: dict[str, float] = partial["sums"]
        # steps that measured each quantity (a head of a sequence a case lacks measured nothing);
        # a checkpoint from before the counts: every step measured everything
        counts: dict[str, int] = partial.setdefault("counts", dict.fromkeys(sums, len(losses)))
        batches = self._batches(epoch) if self.state.batch < self.steps_per_epoch else iter(())
        task = self.progress.start(f"epoch {epoch + 1}/{self.config.optim.epochs}", self.steps_per_epoch,
                                   self.state.batch) if self.progress else None
        try:
            for batch in batches:
                lr = self._lr()
                result = self._step(batch)
                losses.append(result.loss)
                for key, value in result.telemetry.items():
                    if math.isfinite(value):
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
                self.state.batch += 1
                self.state.step += 1
                self.logbook.step({"step": self.state.step, "epoch": epoch + 1, "loss": result.loss,
                                   "lr": lr, **result.telemetry})
                if task is not None:
                    self.progress.advance(task, result.loss)
                if self._stop_agreed:
                    raise KeyboardInterrupt
        finally:
            if task is not None:
                self.progress.finish(task)
            partial["seconds"] += time.perf_counter() - started
        row = self._epoch_row(epoch + 1, losses, {k: v / counts[k] for k, v in sums.items()}, partial["seconds"])
        self._validate_if_due(row, epoch + 1)
        self.logbook.epoch(row)
        self.state.extra.pop("epoch")
        self.state.epoch, self.state.batch = epoch + 1, 0
        self._save_last()
        self.report(_epoch_line(row, self.config.optim.epochs, self.state))
        if "val_dice/mean" in row or self.state.epoch == self.config.optim.epochs:
            self._plot()

    def _step(self, batch: dict[str, Tensor]) -> StepResult:
        device = self.place.device
        image = batch["image"].to(device, non_blocking=True)
        target = batch["label"].to(device, non_blocking=True)
        available = batch.get("available")
        inputs = image if available is None or bool(available.all()) else {
            "image": image, "available": available.to(device, non_blocking=True)}
        return train_step(self.model, self.parts, self.scaler, inputs, target,
                          autocast=self._autocast, check_loss=self._check_step)

    def _batches(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        """The epoch's batches; the order and augmentation depend only on (seed, epoch,
        rank), so a resumed epoch replays the batches it had already done and skips them."""
        seed = zlib.crc32(f"{self.config.seed}/{epoch}/{self.place.rank}".encode())
        self.train_set.transform.set_random_state(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        loader = make_loader(self.train_set, batch_size=self.config.optim.batch_size, shuffle=True,
                             num_workers=self.config.data.num_workers, generator=generator)
        batches = iter(loader)
        if self.state.batch:
            rng = checkpoint.rng_state()  # replaying must not move the run's own random state
            for _ in range(self.state.batch):
                next(batches)
            checkpoint.set_rng_state(rng)
        return batches

    def _check_step(self, loss: Tensor) -> None:
        """Before backward, on every rank at once: stop on a NaN/Inf loss; and agree whether
        Ctrl-C was pressed (on any rank), so that all ranks stop after this same step."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).any().float(),
                             torch.tensor(float(self._interrupts.pending), device=loss.device)])
        bad, stop = self.place.all_sum(flags).tolist()
        self._stop_agreed = stop > 0
        if bad > 0:
            last = self.ckpt_dir / "last.pt"
            kept = f"the last good checkpoint is {last} (epoch {self.state.epoch})" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"the loss became NaN/Inf at epoch {self.state.epoch + 1}, step {self.state.step + 1}; "
                f"the run stopped and {kept}. Start a new run with a lower optim.lr (or optim.amp off)"
            )

    # -------------------------------------------------------------- validation
    def _validate_if_due(self, row: dict[str, Any], epoch: int) -> None:
        every = self.config.validation.every
        if epoch % every and epoch != self.config.optim.epochs:
            return
        v = self.config.validation
        heads = dict(self.parts.balancer.heads.items()) if self.parts.balancer is not None else {}
        rows = validate_cases(
            self.parts.net, heads, (self.val_set[i] for i in range(len(self.val_set))),
            roi_size=self.config.preprocessing.patch_size, overlap=v.overlap,
            sw_batch_size=v.sw_batch_size, hd95=v.hd95, autocast=self._autocast, criterion=self.parts.criterion,
        )
        rows = self.place.gather(rows)
        summary = summarize([{k: x for k, x in r.items() if k != "case_id"} for r in rows])
        row.update({f"val_{key}": stats["mean"] for key, stats in summary.items()})
        row["val_dice/mean"] = sum(row[f"val_dice/{r}"] for r in REGIONS) / len(REGIONS)
        if row["val_dice/mean"] > self.state.best_dice:
            self.state.best_dice, self.state.best_epoch = row["val_dice/mean"], epoch
            if self.place.is_main:
                checkpoint.save(self.ckpt_dir / "best.pt", self._model_payload(row, rows, epoch))
        if self.place.is_main:
            atomic_write_text(self.run_dir / "validation" / f"epoch{epoch:04d}.json", json.dumps(rows, indent=1))
        if self.parts.balancer is not None:
            after_validation(self.parts.balancer, validation_of(self.parts.balancer, row, self.place.mean_over_ranks),
                             self.parts.optimizer, self.config.optim.lr, self.parts.scheduler)

    # ------------------------------------------------------------ checkpoints
    def _model_payload(self, row: dict[str, Any], cases: list[dict], epoch: int) -> dict[str, Any]:
        """What inference and evaluation need: the network, how to build and feed it."""
        return {
            "kind": "model",
            "config": self.config.to_dict(),
            "network": self.parts.net.state_dict(),
            "epoch": epoch,
            "metrics": {k: v for k, v in row.items() if k.startswith("val_")},
            "val_cases": [c["case_id"] for c in cases],
        }

    def _save_last(self) -> None:
        rng = self.place.gather([checkpoint.rng_state()])  # each rank's own generators, by rank
        if not self.place.is_main:
            return
        modules = {name: module.state_dict() for name, module in self.parts.modules().items()}
        checkpoint.save(self.ckpt_dir / "last.pt", {
            "kind": "resume",
            "config": self.config.to_dict(),
            "modules": modules,
            "optimizer": self.parts.optimizer.state_dict(),
            "scheduler": self.parts.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.state),
            "rng": rng,
            "world_size": self.place.world_size,
        })

    def _resume(self) -> None:
        payload = checkpoint.load(self.ckpt_dir / "last.pt", map_location=self.place.device)
        if payload.get("kind") != "resume":
            raise ConfigurationError(f"{self.ckpt_dir / 'last.pt'}: not a resumable checkpoint")
        if checkpoint.network_revision(payload) != checkpoint.NETWORK_REVISION and isinstance(self.parts.net, MultiBranchUNet):
            raise IncompatibleModel(
                f"{self.run_dir}: trained with an earlier multi-branch network (its decoder's last layer normalised); "
                "this version builds it otherwise: start a new run (the old one still evaluates and exports)"
            )
        if payload["world_size"] != self.place.world_size:
            raise ConfigurationError(
                f"{self.run_dir} was trained with {payload['world_size']} process(es); resume it with as many"
            )
        for name, module in self.parts.modules().items():
            module.load_state_dict(payload["modules"][name])
        self.parts.optimizer.load_state_dict(payload["optimizer"])
        self._restore_schedule(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = checkpoint.Progress(**payload["progress"])
        restore_legacy_measurement(self.parts.balancer, self.state.extra)
        checkpoint.set_rng_state(payload["rng"][self.place.rank])

    def _restore_schedule(self, saved: dict[str, Any]) -> None:
        """The scheduler's saved state, at the rates of this run's schedule: optim.epochs may
        have changed (the schedule's length), and the next step's rate comes from the new
        schedule, not from the old one's end (equal when nothing changed). The rates go into
        the optimizer (what the step uses and the run log reports); the scheduler's own record
        of its last rates is its saved state's until its next step."""
        factors = self.parts.scheduler.lr_lambdas  # functions: not part of the saved state
        rates = [base * factor(saved["last_epoch"]) for base, factor in zip(saved["base_lrs"], factors)]
        for group, rate in zip(self.parts.optimizer.param_groups, rates):
            group["lr"] = rate
        self.parts.scheduler.load_state_dict(saved)

    # ------------------------------------------------------------------ output
    def _epoch_row(self, epoch: int, losses: list[float], means: dict[str, float], seconds: float) -> dict[str, Any]:
        n = max(len(losses), 1)
        row: dict[str, Any] = {"epoch": epoch, "step": self.state.step, "lr": self._lr(),
                               "train_loss": sum(losses) / n, "time_s": seconds, "step_s": seconds / n}
        for key, mean in means.items():
            row[key.replace("eps/", "head_dice/", 1)] = mean
        return row

    def _finish(self) -> dict[str, Any]:
        best = self.ckpt_dir / "best.pt"
        rows = self.logbook.metrics() if self.place.is_main else []
        summary = {
            "run": str(self.run_dir),
            "epochs": self.state.epoch,
            "steps": self.state.step,
            "best_epoch": self.state.best_epoch,
            "best_val_dice_mean": self.state.best_dice,
            "best_checkpoint": str(best),
            "final": rows[-1] if rows else {},
            "train_cases": len(self.cases.train),
            "val_cases": len(self.cases.val),
            "world_size": self.place.world_size,
            "provenance": provenance("torch", "monai"),
        }
        if self.place.distributed:
            # equal on all ranks exactly when every rank applied the same updates (e.g. the
            # same CGGM coefficients at every step)
            checksums = self.place.gather([checkpoint.state_sha256(*self.parts.modules().values())[:16]])
            summary["rank_state_checksums"] = checksums
            summary["ranks_consistent"] = len(set(checksums)) == 1
        if self.place.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def _plot(self) -> None:
        if self.place.is_main:
            from brats_cggm.training.plots import plot_run

            plot_run(self.run_dir)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.place.device.type, dtype=self.amp_dtype)

    def _lr(self) -> float:
        return float(self.parts.optimizer.param_groups[0]["lr"])


def train_step(
    model: nn.Module,
    parts: Components,
    scaler: torch.amp.GradScaler,
    image: Tensor | Mapping[str, Tensor],
    target: Tensor,
    autocast: Callable = nullcontext,
    check_loss: Callable[[Tensor], None] = lambda loss: None,
) -> StepResult:
    """One optimizer step: the shared :func:`~multimodal_general.training.step.balanced_step`
    (forward under ``autocast``, task loss + balancer terms, scaled backward, unscale,
    ``modulate``, optimizer step; the heads are a param group of the one optimizer), then the
    schedule's step. ``check_loss`` sees the total loss before backward (the trainer stops on
    NaN there). The telemetry adds each head's loss to the balancer's."""
    task_loss, step = balanced_step(model, parts.balancer, (parts.optimizer,), parts.criterion, image, target,
                                    scaler=scaler, autocast=autocast, check_loss=check_loss,
                                    base_lr=parts.base_lr, scheduler=parts.scheduler)
    telemetry = {}
    if parts.balancer is not None:
        head_losses = parts.balancer.head_losses
        if head_losses:  # one synchronisation for all heads
            values = torch.stack([value.detach().float() for value in head_losses.values()]).tolist()
            telemetry = {f"head_loss/{name}": value for name, value in zip(head_losses, values)}
        telemetry.update(step.as_dict())
    parts.scheduler.step()
    telemetry.pop("step", None)
    return StepResult(float(task_loss.detach()), telemetry)


class DeferredInterrupt:
    """While active (main thread only), Ctrl-C sets :attr:`pending` instead of raising; the
    loop stops after the step in which the ranks agree on it, so checkpoints hold whole
    steps and every rank leaves the collective operations at the same point. A second
    Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.pending = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 where the device has it (no loss scaling needed), else float16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _epoch_line(row: dict[str, Any], epochs: int, state: checkpoint.Progress) -> str:
    line = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  {row['step_s']:.2f} s/step"
    if "val_dice/mean" in row:
        dice = "  ".join(f"{r} {row[f'val_dice/{r}']:.3f}" for r in REGIONS)
        line += f"  | val Dice {dice}  mean {row['val_dice/mean']:.3f} (best {state.best_dice:.3f} @ {state.best_epoch})"
    return line


__all__ = ["FeatureNet", "Interrupted", "Trainer", "TrainingDiverged", "train_step"]
