"""The balancer interface every loop shares: the common options routed once, the hook after a
validation (MSLR, G-Blending) with the encoders' rates applied by one helper, and the one
balanced step (accumulation, GradScaler)."""

import pytest
import torch
from torch import nn

from brats_cggm.training.validation_updates import restore_legacy_measurement
from multimodal_general.balance import (
    BALANCERS,
    COMMON_OPTIONS,
    MSLR,
    Balancer,
    GBlending,
    JointTraining,
    Modality,
    Validation,
    balancer_options,
    make_balancer,
    own_options,
)
from multimodal_general.errors import ConfigurationError
from multimodal_general.training.imbalance import TASKS, LateFusionNet, generate, unimodal_head
from multimodal_general.training.step import after_validation, apply_encoder_rates, balanced_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_modalities(heads: bool = True):
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
    made = {n: nn.Linear(2, 2) for n in encoders} if heads else {}
    return [Modality(n, e, made.get(n), made.get(n)) for n, e in encoders.items()]


def never(what):
    def read():
        raise AssertionError(f"{what} were measured, but no balancer needed them")
    return read


# ------------------------------------------------------------------ common options
def test_balancers_declare_only_their_own_hyperparameters():
    assert COMMON_OPTIONS == {"criterion", "metric", "accumulation_steps", "process_group"}
    for name, cls in BALANCERS.items():
        assert not own_options(cls) & COMMON_OPTIONS, name
        assert balancer_options(name) >= COMMON_OPTIONS
    assert own_options(JointTraining) == set()
    # make_balancer routes the common options to every balancer, its own ones where declared
    balancer = make_balancer("mslr", two_modalities(), criterion=nn.CrossEntropyLoss(), metric="accuracy",
                             accumulation_steps=2, decay=0.25, super_epoch=3, rho=2.0)
    assert isinstance(balancer, MSLR) and balancer.accumulation_steps == 2 and balancer.decay == 0.25
    blending = make_balancer("gblending", two_modalities(), criterion=nn.CrossEntropyLoss(),
                             accumulation_steps=2, decay=0.25, super_epoch=3)
    assert blending.accumulation_steps == 2 and blending.super_epoch == 3
    # direct construction: the common options by keyword, a wrong one is a TypeError
    assert MSLR(two_modalities(heads=False), accumulation_steps=3).accumulation_steps == 3
    with pytest.raises(TypeError):
        MSLR(two_modalities(heads=False), acumulation_steps=3)
    with pytest.raises(ConfigurationError, match="unknown balancer option"):
        make_balancer("mslr", two_modalities(), criterion=nn.CrossEntropyLoss(), acumulation_steps=2)


# ------------------------------------------------------------------ after validation
def test_the_default_hook_does_nothing_and_sets_no_rates():
    balancer = Balancer(two_modalities(heads=False))
    assert balancer.on_validation(Validation(1, never("head metrics"), never("losses"))) is None
    assert balancer.lr_scales() is None


def test_mslr_adapts_from_the_heads_metrics_and_the_loop_applies_its_rates_once():
    balancer = MSLR(two_modalities(), criterion=nn.CrossEntropyLoss(), decay=0.5, applied_by_optimizer=True)
    net = nn.Linear(1, 1)
    optimizer = torch.optim.SGD([*balancer.param_groups(0.1), {"params": net.parameters()}], lr=0.1)
    for group, name in zip(optimizer.param_groups, balancer.modality_names):
        group["modality"] = name
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5)
    # the untrained network sets no best (nothing read)
    assert after_validation(balancer, Validation(0, never("head metrics")), optimizer, 0.1, schedule) is None
    assert after_validation(balancer, Validation(1, {"a": 0.5, "b": float("nan")}), optimizer, 0.1, schedule) == {
        "a": 1.0, "b": 0.5}  # a non-finite metric is a stall
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.025, 0.05])
    assert schedule.base_lrs == pytest.approx([0.1, 0.05, 0.1])
    # gradients scaled by the balancer instead: no rates to set
    assert MSLR(two_modalities(heads=False)).lr_scales() is None
    apply_encoder_rates(optimizer, None, 1.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.025, 0.05])


LOSSES = [
    {"fused": (1.0, 1.2), "a": (1.0, 1.1), "b": (1.0, 1.0)},
    {"fused": (0.5, 0.8), "a": (0.6, 0.9), "b": (0.9, 1.3)},
    {"fused": (0.4, 0.7), "a": (0.5, 0.7), "b": (0.8, 1.1)},
]


def test_gblending_keeps_its_measurement_in_its_state_and_updates_every_super_epoch():
    def make():
        return GBlending(two_modalities(), criterion=nn.CrossEntropyLoss(), super_epoch=2)

    balancer = make()
    assert balancer.measurement() is None
    assert balancer.on_validation(Validation(0, never("head metrics"), LOSSES[0])) is None
    assert balancer.measurement() == LOSSES[0] and int(balancer.measured_epoch) == 0
    assert balancer.on_validation(Validation(1, None, never("losses"))) is None  # too early: nothing read
    weights = balancer.on_validation(Validation(2, None, lambda: LOSSES[1]))
    assert weights == pytest.approx({"fused": 40 / 45, "a": 5 / 45, "b": 0.0}) and balancer.updates == 1
    assert balancer.measurement() == LOSSES[1]
    # resumed from its state: the next update is the uninterrupted run's
    resumed = make()
    resumed.load_state_dict(balancer.state_dict())
    assert resumed.on_validation(Validation(3, None, never("losses"))) is None
    assert resumed.on_validation(Validation(4, None, LOSSES[2])) == balancer.on_validation(Validation(4, None, LOSSES[2]))
    # a state saved before the measurement was kept in it loads as "nothing kept"; a
    # measurement kept by an older BraTS checkpoint moves into the balancer
    legacy = {k: v for k, v in balancer.state_dict().items() if not k.startswith("measured_")}
    old = make()
    old.load_state_dict(legacy)
    assert old.measurement() is None and old.weights.tolist() == balancer.weights.tolist()
    extra = {"gblending": {"epoch": 4, "losses": LOSSES[2]}, "epoch": {}}
    restore_legacy_measurement(old, extra)
    assert old.measurement() == LOSSES[2] and int(old.measured_epoch) == 4 and "gblending" not in extra
    with pytest.raises(ConfigurationError, match="missing"):
        old.keep_measurement(5, {"fused": (1.0, 1.0)})


# ------------------------------------------------------------------ the balanced step
TASK = TASKS["cls2"]


def late_fusion(accumulation_steps: int):
    torch.manual_seed(0)
    model = LateFusionNet({s.name: TASK.input_dim for s in TASK.modalities}, TASK.out_dim)
    heads = {s.name: unimodal_head(32, TASK.out_dim) for s in TASK.modalities}
    balancer = JointTraining([Modality(n, model.encoders[n], h, h[-1]) for n, h in heads.items()],
                             criterion=nn.CrossEntropyLoss(), accumulation_steps=accumulation_steps)
    optimizers = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                  torch.optim.SGD(balancer.parameters(), lr=0.05, momentum=0.9))
    return model, balancer, optimizers


def train(accumulation_steps: int = 1, scaler=None):
    model, balancer, optimizers = late_fusion(accumulation_steps)
    data = generate(TASK, 64, seed=1)
    losses = []
    for start in range(0, 64, 16):
        inputs, target = data.batch(torch.arange(start, start + 16))
        loss, telemetry = balanced_step(model, balancer, optimizers, nn.CrossEntropyLoss(), inputs, target,
                                        scaler=scaler)
        losses.append(float(loss))
        assert int(telemetry.step) == start // 16
    return losses, [p.detach().clone() for module in (model, balancer) for p in module.parameters()]


def test_the_balanced_step_accumulates_micro_batches_and_unscales_before_the_balancer():
    losses, params = train()
    accumulated_losses, accumulated = train(accumulation_steps=2)  # two micro-batches of 8 per step
    assert accumulated_losses == pytest.approx(losses, rel=1e-6)
    for a, b in zip(params, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    scaled_losses, scaled = train(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert scaled_losses == losses
    for a, b in zip(params, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
