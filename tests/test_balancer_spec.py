"""BalancerSpec: one description of a run's balancer, checked when it is made, named by one
method label, built into the balancer, and saved in the flat format run files have always had."""

import pytest
import torch
from torch import nn

from multimodal_general.balance import (
    BALANCERS,
    CGGM,
    CGGM_METHODS,
    CGGM_PRESETS,
    DEFAULT_RHO,
    METHODS,
    METRICS,
    BalancerSpec,
    Modality,
)
from multimodal_general.errors import ConfigurationError
from multimodal_general.training.imbalance import RunConfig
from multimodal_general.training.runner import TrainSettings

#: a sequence task's ``config.yaml`` settings as written before the spec (key order included)
SAVED_SETTINGS = {
    "task": "mosi", "data": "/data/mosi.pkl", "balancer": "cggm", "preset": "paper", "rho": 1.3, "lam": 0.2,
    "epochs": 20, "batch_size": 32, "lr": 0.001, "weight_decay": 0.0001, "optimizer": "adamw", "d_model": 64,
    "layers": 2, "heads": 4, "dropout": 0.1, "fusion_head": "auto", "fold": 1, "max_steps": 0, "bert": "",
    "vit": "", "device": "cpu", "balancer_options": {"alpha": 0.5},
}


def test_one_rho_default():
    assert BalancerSpec().rho == DEFAULT_RHO == 1.2
    assert CGGM.__init__.__kwdefaults__["rho"] == DEFAULT_RHO


@pytest.mark.parametrize("method", METHODS)
def test_a_method_label_parses_into_the_spec_it_names(method):
    spec = BalancerSpec.parse(method, rho=1.5)
    assert spec.rho == 1.5
    assert spec.method == (method if method != "cggm" else "cggm-stable")
    assert BalancerSpec.parse(spec.method) == BalancerSpec(spec.name, spec.preset, rho=DEFAULT_RHO)


def test_labels():
    assert CGGM_METHODS == tuple(f"cggm-{p}" for p in CGGM_PRESETS)
    assert set(METHODS) == {*BALANCERS, *CGGM_METHODS}
    assert BalancerSpec("cggm", "official").method == "cggm-official"
    assert BalancerSpec("mslr", "official").method == "mslr"


def test_with_method_keeps_the_other_settings():
    base = BalancerSpec("none", "stable", rho=1.1, lam=0.3, options={"alpha": 0.5})
    assert base.with_method("cggm-paper") == BalancerSpec("cggm", "paper", 1.1, 0.3, options={"alpha": 0.5})
    assert base.with_method("agm") == BalancerSpec("agm", "stable", 1.1, 0.3, options={"alpha": 0.5})


@pytest.mark.parametrize("make, named", [
    (lambda: BalancerSpec("gradnorm"), "unknown balancer 'gradnorm'"),
    (lambda: BalancerSpec("cggm", "nonsense"), "unknown CGGM preset 'nonsense'"),
    (lambda: BalancerSpec(rho=-1.0), "rho > 0"),
    (lambda: BalancerSpec(rho=0.0), "rho > 0"),
    (lambda: BalancerSpec(lam=-0.1), "lam >= 0"),
    (lambda: BalancerSpec(metric="f1"), "unknown utilization metric 'f1'"),
    (lambda: BalancerSpec(options={"alpah": 1}), "unknown balancer option(s): ['alpah']"),
    (lambda: BalancerSpec(options={"rho": 1}), "rho has a setting of its own"),
    (lambda: BalancerSpec.parse("cggm-fast"), "unknown CGGM preset 'fast'"),
    (lambda: BalancerSpec.parse("ogm_ge-fast"), "unknown method 'ogm_ge-fast'"),
    (lambda: BalancerSpec.parse("bogus"), "unknown balancer 'bogus'"),
])
def test_a_value_that_cannot_work_is_refused_in_one_line(make, named):
    with pytest.raises(ConfigurationError) as info:
        make()
    assert named in str(info.value) and "\n" not in str(info.value)


def two_modalities() -> tuple[list[Modality], nn.Linear]:
    modalities = []
    for name in ("a", "b"):
        head = nn.Sequential(nn.Linear(3, 2))
        modalities.append(Modality(name, nn.Linear(4, 3), head, head[-1]))
    return modalities, nn.Linear(3, 2)  # the fused head's last layer


def test_build_makes_the_balancer_with_the_specs_hyperparameters():
    modalities, fused = two_modalities()
    common = {"fused_last_layer": fused, "criterion": nn.CrossEntropyLoss(), "metric": "accuracy"}
    cggm = BalancerSpec.parse("cggm-official", rho=1.3, lam=0.2).build(modalities, **common)
    assert isinstance(cggm, CGGM) and (cggm.preset.name, cggm.rho, cggm.lam) == ("official", 1.3, 0.2)
    assert cggm.metric is METRICS["accuracy"]  # the loop's, since the spec names none
    scored = BalancerSpec("cggm", metric="neg_mae").build(modalities, **common)
    assert scored.metric is METRICS["neg_mae"]  # the spec's wins
    agm = BalancerSpec("agm", options={"alpha": 0.5}).build(
        modalities, **common, unimodal_output=lambda *args: torch.zeros(1))
    assert agm.alpha == 0.5


def test_flat_records_keep_the_format_of_saved_runs():
    settings = TrainSettings.from_dict(SAVED_SETTINGS, "config.yaml")
    assert settings.balancer == BalancerSpec("cggm", "paper", 1.3, 0.2, options={"alpha": 0.5})
    assert list(settings.to_dict().items()) == list(SAVED_SETTINGS.items())
    record = RunConfig(balancer=BalancerSpec("cggm", "official")).to_dict()
    assert list(record.items()) == [
        ("task", "cls2"), ("balancer", "cggm"), ("preset", "official"), ("seed", 0), ("epochs", 20),
        ("batch_size", 64), ("lr", 0.05), ("rho", 1.2), ("lam", 0.1), ("train_size", 4000), ("val_size", 4000),
        ("fusion_head", "auto"), ("balancer_options", {})]
