"""The training configuration: presets, a YAML file, command-line overrides, in that order.

A configuration file holds any subset of the sections below; what it leaves out comes
from the preset (``cpu-small`` or ``gpu``)::

    data:       {dir: data/phantoms, val_fraction: 0.2, cache: memory}
    preprocess: {spacing: [3, 3, 3], patch_size: [48, 48, 48], num_samples: 2}
    network:    {preset: small, sequence_dropout: 0.0}
    optim:      {optimizer: sgd, lr: 0.01, momentum: 0.99, schedule: poly, epochs: 30}
    balancer:   {name: cggm, preset: stable, rho: 1.0, lam: 0.1, metric: soft_dice}
    validation: {every: 2, overlap: 0.5}
    seed: 0

The resolved configuration is saved in the run folder as ``config.yaml``; ``brats-cggm
train --config RUN/config.yaml`` repeats a run. A setting renamed since (:data:`RENAMED_SETTINGS`)
is still read under its old name, from a file, ``--set`` or a checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from brats_cggm.data.dataset import CACHE_MODES
from brats_cggm.data.transforms import PreprocessConfig
from brats_cggm.errors import BadInputFile, ConfigurationError
from multimodal_general.balance import BalancerSpec
from multimodal_general.io import atomic_write_text
from multimodal_general.resume import differences

#: the balancers that serve segmentation (docs/baselines.md, "Where each one runs today"): AGM
#: through the network's modality mask, MSLR as per-encoder learning rates, G-Blending with the
#: heads' losses measured at validation; modality dropout is the network's sequence dropout
SEGMENTATION_BALANCERS = ("none", "cggm", "mmpareto", "agm", "mslr", "gblending")
#: the balancers that take a batch with a sequence absent (its head skipped, no term from it)
PARTIAL_BALANCERS = ("none", "cggm")
#: balancer options the trainer sets itself
RESERVED_OPTIONS = {"criterion", "fused_last_layer", "unimodal_output", "task_kind", "applied_by_optimizer",
                    "applied_by_model", "accumulation_steps", "process_group"}
#: balancers that cannot serve the segmentation network, and why
REFUSED_BALANCERS = {
    "modality_dropout": "modality dropout is a network setting here: --set network.sequence_dropout=0.25",
    "ogm_ge": "ogm_ge scores each modality by its slice of a fused linear classifier over concatenated "
              "features; the segmentation network fuses by a masked mean and ends in a convolution, so it "
              "has no such slice (use agm: mono-modal responses through the modality mask)",
}


#: settings renamed since runs were saved, ``(section, old name): new name``: configurations
#: (a run's config.yaml, a checkpoint's, ``--set``) that use the old name still load
#: (``modality_dropout`` is also the name of a balancer, which this setting is not)
RENAMED_SETTINGS = {("network", "modality_dropout"): "sequence_dropout"}


@dataclass
class DataConfig:
    #: folder of BraTS cases (any supported layout)
    dir: str | None = None
    #: brats2021, brats2023 or msd; None: detected from the file names
    layout: str | None = None
    #: a split file (``brats-cggm split``); None: made from val_fraction and the seed below
    split: str | None = None
    fold: int = 0
    val_fraction: float = 0.2
    split_seed: int = 0
    #: memory, disk (in RUN/cache) or none
    cache: str = "memory"
    #: data-loader worker processes (0: load in the training process)
    num_workers: int = 0
    #: train on cases that lack sequences too (their absent sequences are switched off through
    #: the modality mask: no branch input, no head loss, no balancer term); false: such a case
    #: is an error, as a missing file usually is
    partial: bool = False


@dataclass
class NetworkConfig:
    #: ``default``, ``small`` (multi-branch) or ``early_fusion`` (baseline)
    preset: str = "small"
    #: probability of switching each sequence off per sample in training (so that any subset works)
    sequence_dropout: float = 0.0
    #: how the branches are fused at every level (multi-branch presets): mean, hemis or attention
    fusion: str = "mean"
    #: constructor arguments that replace the preset's (e.g. ``channels: [8, 16, 32, 64]``)
    overrides: dict[str, Any] = field(default_factory=dict)
    #: train a per-sequence auxiliary head beside each branch (multi-branch presets). Balancers
    #: need them; under balancer ``none`` they train on detached features and only report each
    #: sequence's Dice, so ``false`` trains the same network at a lower cost per step
    heads: bool = True


@dataclass
class OptimConfig:
    #: sgd (momentum, Nesterov) or adamw
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    #: poly ((1 - t)^0.9, nnU-Net's) or cosine, per optimizer step; constant for none
    schedule: str = "poly"
    epochs: int = 30
    #: cases per batch (each gives ``preprocess.num_samples`` patches)
    batch_size: int = 1
    #: learning rate of the training-only auxiliary heads (None: the same as lr)
    head_lr: float | None = None
    #: automatic mixed precision: auto (on a GPU), on, off
    amp: str = "auto"


def segmentation_balancer() -> BalancerSpec:
    """The ``balancer`` section's defaults: CGGM ``stable`` with rho 1.0 (not the spec's default
    1.2: the value the segmentation runs and shipped models were trained with), the auxiliary
    heads scored by soft Dice. ``name`` is one of :data:`SEGMENTATION_BALANCERS`; ``options``
    are a baseline's own (e.g. ``{alpha: 0.5}`` for agm, ``{super_epoch: 4}`` for gblending;
    docs/baselines.md lists each method's)."""
    return BalancerSpec("cggm", "stable", rho=1.0, lam=0.1, metric="soft_dice")


@dataclass
class ValidationConfig:
    #: validate every this many epochs (and after the last)
    every: int = 2
    #: sliding-window overlap and windows per forward pass
    overlap: float = 0.5
    sw_batch_size: int = 2
    #: also compute the 95th-percentile Hausdorff distance (mm)
    hd95: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: dict[str, Any] = field(default_factory=dict)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balancer: BalancerSpec = field(default_factory=segmentation_balancer)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0
    #: auto (cuda when available), cpu or cuda
    device: str = "auto"
    #: weights-only initialisation: a run folder (its best.pt) or a checkpoint file whose
    #: network this run starts from (e.g. phantom pre-training before real fine-tuning)
    init: str | None = None

    @property
    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "configuration") -> TrainConfig:
        config = _build(cls(), current_names(values), source)
        config.preprocess = _typed_section(PreprocessConfig(), config.preprocess, f"{source}: preprocess")
        config.check()
        config.preprocess = config.preprocessing.to_dict()  # every setting, written out
        return config

    def check(self) -> None:
        """Reject values that cannot work, with the option's name."""
        from brats_cggm.network import NETWORK_PRESETS
        from brats_cggm.network.fusion import FUSIONS

        self.preprocessing  # noqa: B018 - PreprocessConfig validates itself
        o, d, v = self.optim, self.data, self.validation
        choices = {
            "optim.optimizer": (o.optimizer, ("sgd", "adamw")),
            "optim.schedule": (o.schedule, ("poly", "cosine", "none")),
            "optim.amp": (o.amp, ("auto", "on", "off")),
            "data.cache": (d.cache, CACHE_MODES),
            "device": (self.device, ("auto", "cpu", "cuda")),
            "network.preset": (self.network.preset, tuple(NETWORK_PRESETS)),
            "network.fusion": (self.network.fusion, FUSIONS),
            "balancer.name": (self.balancer.name, SEGMENTATION_BALANCERS),
        }
        if self.balancer.name in REFUSED_BALANCERS:
            raise ConfigurationError(REFUSED_BALANCERS[self.balancer.name])
        if d.partial and self.balancer.name not in PARTIAL_BALANCERS:
            raise ConfigurationError(
                f"balancer {self.balancer.name} cannot train on cases that lack sequences (data.partial); "
                f"use {' or '.join(PARTIAL_BALANCERS)}")
        if not self.network.heads and self.balancer.name != "none":
            raise ConfigurationError(
                f"balancer {self.balancer.name} measures each sequence with its auxiliary head; "
                "network.heads false works with balancer none only")
        reserved = sorted(set(self.balancer.options) & RESERVED_OPTIONS)
        if reserved:
            raise ConfigurationError(f"balancer.options: {', '.join(reserved)} is set by the trainer")
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")
        positive = {"optim.lr": o.lr, "optim.epochs": o.epochs, "optim.batch_size": o.batch_size,
                    "validation.every": v.every, "validation.sw_batch_size": v.sw_batch_size}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigurationError(f"{name} must be positive; got {value}")
        not_negative = {"data.num_workers": d.num_workers, "optim.momentum": o.momentum,
                        "optim.weight_decay": o.weight_decay, "data.fold": d.fold}
        for name, value in not_negative.items():
            if value < 0:
                raise ConfigurationError(f"{name} must not be negative; got {value}")
        if o.head_lr is not None and not o.head_lr > 0:
            raise ConfigurationError(f"optim.head_lr must be positive; got {o.head_lr}")
        if not 0 <= v.overlap < 1:
            raise ConfigurationError(f"validation.overlap must lie in [0, 1); got {v.overlap}")
        if not 0 < d.val_fraction < 1:
            raise ConfigurationError(f"data.val_fraction must lie in (0, 1); got {d.val_fraction}")

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """``{dotted name: (mine, other's)}`` for every setting the two do not share."""
        return differences(_flat(self.to_dict()), _flat(other.to_dict()))


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (a section's mapping values flattened too)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: The starting points of ``--preset``; a configuration file and options change them.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a 2-core CPU: phantoms (or BraTS) resampled to 3 mm, 48^3 patches that
    # hold most of a brain at that spacing, the narrow network. AdamW: in this budget
    # (~200 steps) SGD (lr 0.01-0.05, momentum 0.9-0.99) still predicted no tumour at all
    # on 30 phantoms after 8 epochs, where AdamW reached WT Dice 0.6 (docs/training.md).
    "cpu-small": {
        "preprocess": {"spacing": [3.0, 3.0, 3.0], "patch_size": [48, 48, 48], "num_samples": 2},
        "network": {"preset": "small"},
        "optim": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 1e-4, "epochs": 20},
        "validation": {"every": 2, "sw_batch_size": 2},
    },
    # Real BraTS scans on a 2-core CPU, ~10 cases in about 30 minutes: 2 mm (enhancing rims
    # are 2-5 mm thick; at 3 mm ET was lost), 64^3 patches (most of a brain at 2 mm), the
    # narrow network with HeMIS fusion, sequence dropout so that any subset works, wider
    # intensity augmentation and a bias field for scans from other scanners, AdamW at 1e-3
    # (3e-3 collapsed with dropout); the auxiliary heads at 1e-2 (on detached features, at 1e-3
    # they were still near the all-background solution after 1000 steps and the T1ce head
    # predicted nothing). docs/real_data.md has the measurements behind it.
    "cpu-real": {
        "preprocess": {"spacing": [2.0, 2.0, 2.0], "patch_size": [64, 64, 64], "num_samples": 2,
                       "intensity_scale": 0.2, "intensity_shift": 0.2, "bias_field": 0.2},
        "network": {"preset": "small", "fusion": "hemis", "sequence_dropout": 0.25},
        "optim": {"optimizer": "adamw", "lr": 0.001, "weight_decay": 1e-4, "epochs": 150, "head_lr": 0.01},
        "balancer": {"name": "none"},
        "validation": {"every": 10, "sw_batch_size": 2},
    },
    # One GPU, full resolution: 1 mm, 128^3 patches, the default network (Optimus-style
    # BraTS recipes train 300+ epochs; set optim.epochs for your budget).
    "gpu": {
        "preprocess": {"spacing": [1.0, 1.0, 1.0], "patch_size": [128, 128, 128], "num_samples": 2},
        "network": {"preset": "default"},
        "optim": {"epochs": 300, "lr": 0.01, "batch_size": 1},
        "data": {"num_workers": 4},
        "validation": {"every": 5, "sw_batch_size": 4},
    },
}


def resolve_config(
    preset: str = "cpu-small",
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Preset, then the YAML ``file``, then ``overrides`` (dotted names such as
    ``{"optim.epochs": 5, "balancer.name": "none"}``; None values are skipped)."""
    if preset not in TRAINING_PRESETS:
        raise ConfigurationError(
            f"unknown training preset '{preset}'; choose one of {', '.join(TRAINING_PRESETS)}"
        )
    values = copy.deepcopy(TRAINING_PRESETS[preset])
    source = "configuration"
    if file is not None:
        values = merge(values, current_names(read_yaml(file)))
        source = str(file)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            values = merge(values, current_names(_nest(dotted.split("."), value)))
    return TrainConfig.from_dict(values, source)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInputFile(path, "configuration file is missing") from None
    except OSError as error:
        raise BadInputFile(path, f"cannot be read ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BadInputFile(path, f"not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BadInputFile(path, "a configuration file must hold a mapping of sections")
    return values


def current_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (sections of settings) with each of :data:`RENAMED_SETTINGS` under its new name."""
    values = dict(values)
    for (section, old), new in RENAMED_SETTINGS.items():
        settings = values.get(section)
        if isinstance(settings, Mapping) and old in settings:
            values[section] = {new if name == old else name: value for name, value in settings.items()}
    return values


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` written over it, section by section."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "overrides":
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: _nest(keys[1:], value) if len(keys) > 1 else value}


def _build(defaults: Any, values: Any, where: str) -> Any:
    """The dataclass ``defaults`` with ``values`` written over it, each checked against the type
    of its default (a section, such as ``balancer``, built the same way from its own defaults)."""
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(defaults)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigurationError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    built = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            built[name] = _build(default, value, f"{where}: {name}")
        elif default is None:
            built[name] = _optional(str(known[name].type), value, f"{where}: {name}")
        else:
            built[name] = _typed(default, value, f"{where}: {name}")
    try:
        return replace(defaults, **built)
    except ConfigurationError as error:  # a section that checks itself (the balancer)
        raise ConfigurationError(f"{where}: {error}") from None


def _optional(annotation: str, value: Any, where: str) -> Any:
    """An optional setting (``str | None`` or ``float | None``): None or a value of its type."""
    if value is None:
        return None
    if annotation.startswith("float"):
        return _typed(0.0, value, where)
    return _typed("", value, where)


def _typed(default: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type of its default (a number where a number goes)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigurationError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return float(value) if isinstance(default, float) else value


def _typed_section(defaults: Any, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The settings of a dict-valued section, each checked against the type of its default
    (a list of numbers where the default is a tuple); unknown names are left to the section."""
    checked = {}
    for name, value in values.items():
        default = getattr(defaults, name, None)
        if isinstance(default, tuple):
            if not (isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ConfigurationError(f"{where}: {name}: expected a list of numbers, got {value!r}")
            checked[name] = list(value)
        else:
            checked[name] = _typed(default, value, f"{where}: {name}")
    return checked


def _plain(value: Any) -> Any:
    """Tuples become lists, so the YAML is plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
