"""CGGM with gradient accumulation and with mixed precision (CPU autocast + GradScaler).

Accumulation: ``extra_loss`` per micro-batch, ``modulate`` once per optimizer step, one
``B`` per step from the statistics of all micro-batches; the result must match one big batch.
AMP: ``modulate`` runs after ``GradScaler.unscale_``, so its telemetry and its scaling act on
true (unscaled) gradients, and the cosines of ``L_gm`` are taken on unscaled gradients.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import Tensor, nn
from training_cases import torch_threads

from multimodal_general.balance import CGGM, Modality
from multimodal_general.errors import ConfigurationError
from multimodal_general.training.imbalance import TASKS, LateFusionNet, generate, unimodal_head

TASK = TASKS["cls2"]
LR = 0.05
close = torch.testing.assert_close


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: with two OpenMP threads on a busy 2-core machine every op waits
    milliseconds for the other thread; one thread is ~100x faster here."""
    with torch_threads(1):
        yield


def true_class_probability(logits: Tensor, target: Tensor) -> Tensor:
    """A continuous utilization metric (per-sample probability of the true class).

    With ``accuracy`` on a batch of 8, ``eps`` moves in steps of 1/8 and the paper's ``B``
    is often 0 or ~1e7; this metric gives ordinary, distinct coefficients from step 0 on,
    so the comparisons below cannot pass because everything is zero."""
    return logits.float().softmax(dim=-1).gather(1, target[:, None]).squeeze(1)


METRICS = {"accuracy": "accuracy", "p_true": true_class_probability}


def make(preset: str, *, lam: float, metric="p_true", accumulation_steps: int = 1, seed: int = 0):
    """LateFusionNet + CGGM as ``tasks.imbalance.build`` makes them, with the options that
    ``build`` does not expose; the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    model = LateFusionNet({s.name: TASK.input_dim for s in TASK.modalities}, TASK.out_dim)
    heads = {s.name: unimodal_head(32, TASK.out_dim) for s in TASK.modalities}
    criterion = nn.CrossEntropyLoss()
    modalities = [
        Modality(name, model.encoders[name], head, head[-1]) for name, head in heads.items()
    ]
    balancer = CGGM(
        modalities,
        fused_last_layer=model.last_layer,
        criterion=criterion,
        metric=METRICS[metric] if isinstance(metric, str) else metric,
        preset=preset,
        lam=lam,
        accumulation_steps=accumulation_steps,
    )
    optimizers = (
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
        torch.optim.SGD(balancer.parameters(), lr=LR, momentum=0.9),
    )
    return model, balancer, criterion, optimizers


def encoder_grads(balancer: CGGM) -> dict[str, list[Tensor]]:
    return {
        name: [g.detach().clone() for g in balancer.encoder_grads(name)]
        for name in balancer.modality_names
    }


def all_grads(*modules: nn.Module) -> dict[str, Tensor]:
    return {
        f"{i}.{name}": p.grad.detach().clone()
        for i, module in enumerate(modules)
        for name, p in module.named_parameters()
        if p.grad is not None
    }


def assert_scaled_once(
    before: dict[str, list[Tensor]], after: dict[str, list[Tensor]], b: Tensor
) -> None:
    """After ``modulate`` every encoder gradient of modality i is B_i times what it was."""
    for index, name in enumerate(before):
        assert len(before[name]) == len(after[name]) > 0
        for g0, g1 in zip(before[name], after[name]):
            close(g1, g0 * b[index], rtol=1e-6, atol=0)


def norms(grads: dict[str, list[Tensor]]) -> Tensor:
    return torch.stack(
        [torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[name]])) for name in grads]
    )


def assert_grads_close(a: dict[str, Tensor], b: dict[str, Tensor], **tol) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


# ------------------------------------------------------------------ accumulation
STEPS = 4
BATCH = 8


def tensors(state: dict) -> list[torch.Tensor]:
    """The tensors of a state dict (a balancer's also holds its descriptive extra state)."""
    return [v for v in state.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("metric", ["p_true", "accuracy"])
@pytest.mark.parametrize("preset", ["paper", "stable"])
def test_two_micro_batches_equal_one_batch(preset, metric):
    data = generate(TASK, STEPS * BATCH, seed=3)
    model1, bal1, criterion, opts1 = make(preset, lam=0.0, metric=metric, accumulation_steps=1)
    model2, bal2, _, opts2 = make(preset, lam=0.0, metric=metric, accumulation_steps=2)
    for a, b in zip(
        list(model1.state_dict().values()) + tensors(bal1.state_dict()),
        list(model2.state_dict().values()) + tensors(bal2.state_dict()),
        strict=True,
    ):
        assert torch.equal(a, b)

    coefficients = []
    for step in range(STEPS):
        inputs, target = data.batch(torch.arange(step * BATCH, (step + 1) * BATCH))

        # one batch of 8, accumulation_steps=1
        for opt in opts1:
            opt.zero_grad(set_to_none=True)
        output, features = model1(inputs)
        task_loss = criterion(output, target)
        (task_loss + bal1.extra_loss(features, output, target, task_loss)).backward()
        before1, rest_before1 = encoder_grads(bal1), all_grads(model1.head, bal1)
        tel1 = bal1.modulate()
        after1, full1 = encoder_grads(bal1), all_grads(model1, bal1)

        # two micro-batches of 4, each loss divided by accumulation_steps
        for opt in opts2:
            opt.zero_grad(set_to_none=True)
        for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            micro_inputs = {k: v[half] for k, v in inputs.items()}
            output, features = model2(micro_inputs)
            task_loss = criterion(output, target[half])
            loss = task_loss + bal2.extra_loss(features, output, target[half], task_loss)
            (loss / 2).backward()
        before2, rest_before2 = encoder_grads(bal2), all_grads(model2.head, bal2)
        tel2 = bal2.modulate()
        after2, full2 = encoder_grads(bal2), all_grads(model2, bal2)

        # the step's utilization combines both micro-batches: one eps, one B
        m1, m2 = tel1.per_modality, tel2.per_modality
        close(m2["eps"], m1["eps"], rtol=0, atol=1e-6)
        close(m2["B"], m1["B"], rtol=1e-5, atol=1e-6)
        close(m2["grad_norm"], m1["grad_norm"], rtol=1e-5, atol=1e-8)
        # grad_norm telemetry: the accumulated encoder gradients before modulation
        close(m1["grad_norm"], norms(before1), rtol=1e-6, atol=0)
        close(m2["grad_norm"], norms(before2), rtol=1e-6, atol=0)
        # B applied exactly once, to the accumulated gradients, and to encoders only
        assert_scaled_once(before1, after1, m1["B"])
        assert_scaled_once(before2, after2, m2["B"])
        assert_grads_close(rest_before1, all_grads(model1.head, bal1), rtol=0, atol=0)
        assert_grads_close(rest_before2, all_grads(model2.head, bal2), rtol=0, atol=0)
        # and the same gradients as the single batch, everywhere
        assert_grads_close(full2, full1, rtol=1e-5, atol=1e-7)
        coefficients.append(m1["B"])

        for opt in opts1 + opts2:
            opt.step()

    b = torch.stack(coefficients)
    assert torch.isfinite(b).all()
    if metric == "p_true":
        # the coefficients are not trivial (B == 1 would hide a missing or repeated scaling)
        assert ((b - 1).abs() > 0.01).any(), b
        assert ((b[:, 0] - b[:, 1]).abs() > 1e-3).any(), b
    params1 = list(model1.parameters()) + list(bal1.parameters())
    params2 = list(model2.parameters()) + list(bal2.parameters())
    for p1, p2 in zip(params1, params2, strict=True):
        close(p2, p1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["paper", "official", "stable"])
def test_extra_loss_more_often_than_accumulation_steps_is_an_error(preset):
    data = generate(TASK, 8, seed=1)
    inputs, target = data.batch(torch.arange(8))
    for steps in (1, 2):
        model, balancer, criterion, _ = make(preset, lam=0.1, accumulation_steps=steps)
        for _ in range(2):  # the contract holds again after modulate
            for _ in range(steps):
                output, features = model(inputs)
                task_loss = criterion(output, target)
                (task_loss + balancer.extra_loss(features, output, target, task_loss)).backward()
            output, features = model(inputs)
            task_loss = criterion(output, target)
            with pytest.raises(ConfigurationError, match="without modulate"):
                balancer.extra_loss(features, output, target, task_loss)
            balancer.modulate()


# --------------------------------------------------------------------------- AMP
AMP_BATCH = 32
INIT_SCALE = 2.0**10


def amp_step(*, autocast: bool, scaler: bool, preset: str = "paper") -> dict:
    """One optimizer step in the contract's order; what it saw before and after modulate."""
    data = generate(TASK, AMP_BATCH, seed=5)
    inputs, target = data.batch(torch.arange(AMP_BATCH))
    model, balancer, criterion, (opt, head_opt) = make(preset, lam=0.1)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if scaler else None
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        output, features = model(inputs)
        task_loss = criterion(output, target)
        loss = task_loss + balancer.extra_loss(features, output, target, task_loss)
    if autocast:
        assert output.dtype == torch.bfloat16
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        scaled_norm = norms({"easy": balancer.encoder_grads("easy")})[0]
        grad_scaler.unscale_(opt)
    else:
        loss.backward()
        scaled_norm = None
    before = encoder_grads(balancer)
    telemetry = balancer.modulate()
    after = encoder_grads(balancer)
    initial = [p.detach().clone() for p in list(model.parameters()) + list(balancer.parameters())]
    if grad_scaler is not None:
        grad_scaler.step(opt)
        grad_scaler.step(head_opt)
        grad_scaler.update()
    else:
        opt.step()
        head_opt.step()
    params = [p.detach().clone() for p in list(model.parameters()) + list(balancer.parameters())]
    return {
        "telemetry": telemetry,
        "before": before,
        "after": after,
        "scaled_norm": scaled_norm,
        "initial": initial,
        "params": params,
        "scale": grad_scaler.get_scale() if grad_scaler is not None else None,
    }


@pytest.fixture(scope="module")
def amp_runs() -> dict[str, dict]:
    return {
        "scaled": amp_step(autocast=True, scaler=True),
        "bf16": amp_step(autocast=True, scaler=False),
        "fp32": amp_step(autocast=False, scaler=False),
    }


def test_grad_scaler_exists_on_cpu():
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    assert scaler.is_enabled() and scaler.get_scale() == INIT_SCALE


def test_amp_telemetry_sees_unscaled_gradients(amp_runs):
    scaled, bf16 = amp_runs["scaled"], amp_runs["bf16"]
    tel = scaled["telemetry"]
    # (a) grad_norm is the norm of the unscaled encoder gradients before modulation
    unscaled_norms = norms(scaled["before"])
    close(tel.per_modality["grad_norm"], unscaled_norms, rtol=1e-6, atol=0)
    # ... which really are unscaled: the backward was scaled by 2**10, unscale_ undid it
    assert float(scaled["scaled_norm"]) == pytest.approx(
        INIT_SCALE * float(unscaled_norms[0]), rel=1e-5
    )
    close(
        tel.per_modality["grad_norm"], bf16["telemetry"].per_modality["grad_norm"],
        rtol=1e-5, atol=0,
    )
    for name in scaled["before"]:
        for g_scaled, g_plain in zip(scaled["before"][name], bf16["before"][name], strict=True):
            close(g_scaled, g_plain, rtol=1e-5, atol=1e-8)


def test_amp_modulation_scales_unscaled_gradients_once(amp_runs):
    scaled = amp_runs["scaled"]
    b = scaled["telemetry"].per_modality["B"]
    assert torch.isfinite(b).all() and ((b - 1).abs() > 0.01).all() and (b[0] - b[1]).abs() > 1e-3
    # (b) encoder grads after modulate are B_i times the (unscaled) grads before
    assert_scaled_once(scaled["before"], scaled["after"], b)


def test_amp_cosines_match_unscaled_run(amp_runs):
    scaled, bf16, fp32 = (amp_runs[k]["telemetry"] for k in ("scaled", "bf16", "fp32"))
    assert "cos" in scaled.per_modality and "L_gm" in scaled.scalars
    # (c) same bf16 forward without a scaler: the cosines do not see the loss scale
    s, b, f = scaled.per_modality, bf16.per_modality, fp32.per_modality
    close(s["cos"], b["cos"], rtol=0, atol=1e-6)
    close(s["B"], b["B"], rtol=0, atol=1e-6)
    # ... and agree with full precision within bf16 tolerance
    close(s["cos"], f["cos"], rtol=0, atol=1e-2)
    close(s["B"], f["B"], rtol=0, atol=1e-2)
    close(s["grad_norm"], f["grad_norm"], rtol=5e-2, atol=0)


def test_amp_scaler_steps_both_optimizers(amp_runs):
    scaled, bf16 = amp_runs["scaled"], amp_runs["bf16"]
    # (d) no inf/nan was found (the scale did not back off) and every parameter moved
    assert scaled["scale"] == INIT_SCALE
    for p0, p1 in zip(scaled["initial"], scaled["params"], strict=True):
        assert torch.isfinite(p1).all()
        assert not torch.equal(p0, p1)
    # the steps equal those of the same run without a scaler (heads unscaled by scaler.step)
    for p_scaled, p_plain in zip(scaled["params"], bf16["params"], strict=True):
        close(p_scaled, p_plain, rtol=1e-5, atol=1e-7)
