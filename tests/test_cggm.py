"""CGGM inside a training step: what is scaled, what L_gm is, and exact resume."""

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, make_batch, make_setup

from multimodal_general.balance import make_balancer
from multimodal_general.training.step import balanced_step


def forward(model, balancer, criterion, inputs, target):
    output, features = model(inputs)
    task_loss = criterion(output, target)
    return output, features, task_loss, balancer.extra_loss(features, output, target, task_loss)


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_only_registered_encoder_gradients_are_scaled_by_exactly_b():
    model, balancer, criterion = make_setup(3, preset="paper", lam=0.0)
    inputs, target = make_batch(3)
    _, _, task_loss, extra = forward(model, balancer, criterion, inputs, target)
    (task_loss + extra).backward()
    encoders = {n: list(model.encoders[n].parameters()) for n in balancer.modality_names}
    before = {n: grads(p) for n, p in encoders.items()}
    head_before = grads(model.head.parameters())
    heads_before = grads(balancer.parameters())
    telemetry = balancer.modulate()
    b = telemetry.per_modality["B"]
    eps = telemetry.per_modality["eps"]
    # first step: d = eps - 0, so B is the paper formula of the batch accuracies
    assert torch.allclose(b, 1.2 * (eps.sum() - eps) / (eps.sum() + 1e-8))
    assert not torch.allclose(b, torch.ones(3))
    for i, name in enumerate(balancer.modality_names):
        for old, param in zip(before[name], encoders[name]):
            assert torch.equal(param.grad, old * b[i])
    for old, param in zip(head_before, model.head.parameters()):
        assert torch.equal(param.grad, old)  # the fused head is not an encoder
    for old, param in zip(heads_before, balancer.parameters()):
        assert torch.equal(param.grad, old)


def test_heads_never_send_gradient_into_the_encoders_or_the_fused_head():
    model, balancer, criterion = make_setup(2, lam=0.0)
    inputs, target = make_batch(2)
    *_, extra = forward(model, balancer, criterion, inputs, target)
    extra.backward()  # the heads' losses alone
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in balancer.parameters())


def test_heads_are_absent_from_the_inference_model_state_dict():
    model, balancer, _ = make_setup(2)
    model_tensors = {t.data_ptr() for t in model.state_dict().values()}
    head_tensors = {p.data_ptr() for p in balancer.parameters()}
    assert head_tensors and not model_tensors & head_tensors
    assert all("head" not in key or key.startswith("head.") for key in model.state_dict())
    assert {k.split(".")[0] for k in balancer.state_dict() if "." in k} == {"heads"}


def direct_l_gm(model, balancer, inputs, target):
    """L_gm from closed-form cross-entropy gradients of the last layers (no autograd)."""
    with torch.no_grad():
        output, features = model(inputs)
        onehot = F.one_hot(target, CLASSES).float()
        fused_in = model.head[:-1](torch.cat(list(features.values()), 1))
        g_fused = ((output.softmax(1) - onehot).T @ fused_in / len(target)).flatten()
        b = balancer.coefficients
        terms = []
        for i, name in enumerate(balancer.modality_names):
            head = balancer.heads[name]
            hidden = head[:-1](features[name])
            g_head = ((head(features[name]).softmax(1) - onehot).T @ hidden / len(target)).flatten()
            cos = g_fused @ g_head / (g_fused.norm() * g_head.norm())
            terms.append(b[i].abs() - b[i] * cos)
        return torch.stack(terms).mean()


def test_paper_direction_loss_matches_a_direct_computation_and_has_gradients():
    model, balancer, criterion = make_setup(2, preset="paper", lam=0.5)
    inputs, target = make_batch(2, n=16)
    _, _, task_loss, extra = forward(model, balancer, criterion, inputs, target)
    l_gm = (extra - sum(balancer.head_losses.values())) / 0.5
    assert torch.allclose(l_gm, direct_l_gm(model, balancer, inputs, target), atol=1e-6)
    assert float(l_gm.detach()) > 0
    params = [*model.encoders.parameters(), *model.head.parameters()]
    gradients = torch.autograd.grad(extra, params, allow_unused=True)
    for name in balancer.modality_names:
        encoder_grads = gradients[: len(params)][: sum(1 for _ in model.encoders.parameters())]
        assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads), name
    fused = gradients[-len(list(model.head.parameters())) :]
    assert all(g is not None and g.abs().sum() > 0 for g in fused)


def test_official_reproduces_weight_cosine_and_one_step_lag():
    lam, rho = 0.5, 1.2
    model, balancer, criterion = make_setup(2, preset="official", lam=lam, rho=rho)
    optimizers = (
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.SGD(balancer.parameters(), lr=0.1),
    )
    inputs, target = make_batch(2)
    # step 1: no L_gm yet, only the heads' losses
    *_, extra = forward(model, balancer, criterion, inputs, target)
    assert torch.equal(extra, sum(balancer.head_losses.values()))
    for o in optimizers:
        o.zero_grad()
    (criterion(model(inputs)[0], target) + extra).backward()
    telemetry = balancer.modulate()
    # what step 1 measured, from the weights before the optimizer step
    w_fused = model.last_layer.weight.detach().clone().requires_grad_(True)
    b = telemetry.per_modality["B"] / rho  # no rho in L_gm
    cos = torch.stack(
        [F.cosine_similarity(w_fused.flatten(), balancer.heads[n][-1].weight.detach().flatten(), dim=0)
         for n in balancer.modality_names]
    )
    assert torch.allclose(telemetry.per_modality["cos"], cos.detach())
    expected = (b.abs() - b * cos).mean()
    (expected_grad,) = torch.autograd.grad(expected, w_fused)
    for o in optimizers:
        o.step()
    # step 2: step 1's L_gm is added, with step 1's value and gradient, to the fused weight only
    inputs2, target2 = make_batch(2, seed=7)
    *_, extra2 = forward(model, balancer, criterion, inputs2, target2)
    term = extra2 - sum(balancer.head_losses.values())
    assert torch.allclose(term, lam * expected.detach(), atol=1e-7)
    params = [*model.encoders.parameters(), *model.head.parameters()]
    gradients = torch.autograd.grad(term, params, allow_unused=True)
    for param, grad in zip(params, gradients):
        if param is model.last_layer.weight:
            assert torch.allclose(grad, lam * expected_grad, atol=1e-7)
        else:
            assert grad is None or not grad.any()


def run_steps(model, balancer, criterion, optimizers, steps, first=0):
    coefficients = []
    for step in range(first, first + steps):
        inputs, target = make_batch(2, n=16, seed=100 + step)
        _, telemetry = balanced_step(model, balancer, optimizers, criterion, inputs, target)
        coefficients.append(telemetry.per_modality["B"].clone())
    return coefficients


def make_optimizers(model, balancer, model_lr=0.05):
    return (
        torch.optim.SGD(model.parameters(), lr=model_lr, momentum=0.9),
        torch.optim.SGD(balancer.parameters(), lr=0.05, momentum=0.9),
    )


@pytest.mark.parametrize("preset", ["paper", "official", "stable", "deficit"])
def test_state_dict_round_trip_resumes_exactly(preset):
    options = dict(preset=preset, lam=0.1, rho=1.2)
    # the unguarded presets meet B ~ 1e6 within a few steps (batch accuracies cancel):
    # a tiny learning rate keeps the weights finite, so that the comparison means something
    model_lr = 0.05 if preset in ("stable", "deficit") else 1e-7
    model, balancer, criterion = make_setup(2, **options)
    optimizers = make_optimizers(model, balancer, model_lr)
    uninterrupted = run_steps(model, balancer, criterion, optimizers, 8)

    model, balancer, criterion = make_setup(2, **options)
    optimizers = make_optimizers(model, balancer, model_lr)
    first = run_steps(model, balancer, criterion, optimizers, 4)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "balancer": balancer.state_dict(),
         "optimizers": [o.state_dict() for o in optimizers]},
        buffer,
    )
    del model, balancer, optimizers
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, balancer, criterion = make_setup(2, seed=123, **options)  # other initial weights
    optimizers = make_optimizers(model, balancer, model_lr)
    model.load_state_dict(checkpoint["model"])
    balancer.load_state_dict(checkpoint["balancer"])
    for optimizer, state in zip(optimizers, checkpoint["optimizers"]):
        optimizer.load_state_dict(state)
    resumed = first + run_steps(model, balancer, criterion, optimizers, 4, first=4)

    assert len(resumed) == len(uninterrupted)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for a, b in zip(resumed, uninterrupted):
        assert torch.equal(a, b)
    reference_model, reference_balancer, _ = make_setup(2, **options)
    reference_optimizers = make_optimizers(reference_model, reference_balancer, model_lr)
    run_steps(reference_model, reference_balancer, criterion, reference_optimizers, 8)
    for a, b in zip(model.state_dict().values(), reference_model.state_dict().values()):
        assert torch.equal(a, b)
    for (key, a), b in zip(balancer.state_dict().items(), reference_balancer.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


def test_stable_leaves_the_first_step_untouched_and_then_balances():
    model, balancer, criterion = make_setup(2, preset="stable")
    optimizers = make_optimizers(model, balancer)
    coefficients = run_steps(model, balancer, criterion, optimizers, 30)
    assert torch.equal(coefficients[0], torch.ones(2))  # no trend after one observation
    assert any(not torch.equal(b, torch.ones(2)) for b in coefficients[1:])
    assert all(((b >= 0) & (b <= 1.2)).all() for b in coefficients)


def test_deficit_scales_each_encoder_by_its_heads_deficit_from_the_first_step():
    model, balancer, criterion = make_setup(3, preset="deficit", lam=0.0, rho=1.0)
    inputs, target = make_batch(3)
    _, _, task_loss, extra = forward(model, balancer, criterion, inputs, target)
    (task_loss + extra).backward()
    before = {n: grads(model.encoders[n].parameters()) for n in balancer.modality_names}
    telemetry = balancer.modulate()
    eps, b = telemetry.per_modality["eps"], telemetry.per_modality["B"]
    # one observation: the smoothed level is the batch accuracy itself
    deficit = 1 - eps
    assert torch.allclose(telemetry.per_modality["d"], deficit, atol=1e-6)
    assert torch.allclose(b, deficit / deficit.mean(), atol=1e-6)
    for i, name in enumerate(balancer.modality_names):
        for old, param in zip(before[name], model.encoders[name].parameters()):
            assert torch.allclose(param.grad, old * b[i])


def cggm_steps(scale_by: str, optimizer: str, steps: int = 3):
    """The encoders' weights after ``steps`` balanced steps of deficit CGGM (``lam`` 0), B
    applied as ``scale_by`` says; the rates as the loop sets them, and each step's B."""
    model, balancer, criterion = make_setup(3, preset="deficit", lam=0.0, rho=1.0, scale_by=scale_by)
    groups = balancer.param_groups(0.1)
    for group, name in zip(groups, balancer.modality_names):
        group["modality"] = name
    in_encoders = {id(p) for g in groups for p in g["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in in_encoders]})
    groups.append({"params": list(balancer.parameters())})
    make = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    opt = make(groups, lr=0.1, **({"weight_decay": 0.0} if optimizer == "sgd" else {}))
    coefficients, rates = [], []
    for step in range(steps):
        inputs, target = make_batch(3, seed=step)
        _, telemetry = balanced_step(model, balancer, (opt,), criterion, inputs, target, base_lr=0.1)
        coefficients.append(telemetry.per_modality["B"])
        rates.append([g["lr"] for g in opt.param_groups[:3]])
    return {n: [p.detach().clone() for p in model.encoders[n].parameters()] for n in balancer.modality_names}, \
        coefficients, rates


def test_b_as_learning_rate_is_the_paper_step_under_sgd_and_survives_adamw():
    """scale_by="learning_rate": the encoder groups' rates are B times the base rate at every
    step. Under plain SGD that is exactly the step of scaled gradients; under AdamW, where the
    first step's update does not depend on a gradient scale, only the rate makes B act."""
    by_grad, b_grad, rates_grad = cggm_steps("gradient", "sgd")
    by_rate, b_rate, rates = cggm_steps("learning_rate", "sgd")
    assert all(torch.allclose(x, y) for x, y in zip(b_grad, b_rate))
    assert all(not torch.allclose(b, torch.ones(3)) for b in b_rate)
    assert all(r == pytest.approx([0.1 * float(v) for v in b]) for r, b in zip(rates, b_rate))
    assert rates_grad == [[0.1] * 3] * 3  # the paper's mode leaves the rates alone
    for name in by_grad:
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(by_grad[name], by_rate[name]))
    start, _, _ = cggm_steps("gradient", "adamw", steps=0)
    adam_grad, _, _ = cggm_steps("gradient", "adamw", steps=1)
    adam_rate, (b,), _ = cggm_steps("learning_rate", "adamw", steps=1)
    for i, name in enumerate(start):
        moved_grad = torch.cat([(a - s).flatten() for a, s in zip(adam_grad[name], start[name])]).abs().max()
        moved_rate = torch.cat([(a - s).flatten() for a, s in zip(adam_rate[name], start[name])]).abs().max()
        assert float(moved_rate / moved_grad) == pytest.approx(float(b[i]), rel=1e-3)


def test_an_unknown_scale_by_is_refused_and_a_loop_that_sets_no_rates_is_stopped():
    with pytest.raises(Exception, match="scale_by must be one of gradient, learning_rate"):
        make_setup(2, scale_by="weights")
    model, balancer, criterion = make_setup(2, preset="deficit", scale_by="learning_rate")
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1)
    balanced_step(model, balancer, (opt,), criterion, *make_batch(2))
    with pytest.raises(Exception, match="needs a loop that applies its lr_scales"):
        balanced_step(model, balancer, (opt,), criterion, *make_batch(2))


def test_joint_training_reports_heads_and_leaves_gradients_alone():
    model, cggm, criterion = make_setup(2)
    modalities = [m for m in _modalities_of(model, cggm)]
    balancer = make_balancer("none", modalities, criterion=criterion, fused_last_layer=model.last_layer, rho=1.2)
    inputs, target = make_batch(2)
    _, _, task_loss, extra = forward(model, balancer, criterion, inputs, target)
    assert torch.equal(extra, sum(balancer.head_losses.values()))
    (task_loss + extra).backward()
    before = grads(model.parameters())
    telemetry = balancer.modulate()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert set(telemetry.as_dict()) == {"step", "eps/m0", "eps/m1", "grad_norm/m0", "grad_norm/m1"}


def _modalities_of(model, cggm):
    from multimodal_general.balance import Modality

    for name in cggm.modality_names:
        head = cggm.heads[name]
        yield Modality(name, model.encoders[name], head, head[-1])


def test_telemetry_has_every_quantity_per_modality():
    model, balancer, criterion = make_setup(3, preset="stable")
    optimizers = make_optimizers(model, balancer)
    inputs, target = make_batch(3)
    balanced_step(model, balancer, optimizers, criterion, inputs, target)
    inputs, target = make_batch(3, seed=5)
    _, telemetry = balanced_step(model, balancer, optimizers, criterion, inputs, target)
    row = telemetry.as_dict()
    for key in ("eps", "d", "B", "cos", "grad_norm"):
        for name in ("m0", "m1", "m2"):
            assert f"{key}/{name}" in row
    assert "L_gm" in row and row["step"] == 1.0


def test_modulate_without_extra_loss_is_a_clear_error():
    from multimodal_general.errors import ConfigurationError

    _, balancer, _ = make_setup(2)
    with pytest.raises(ConfigurationError, match="without extra_loss"):
        balancer.modulate()


def test_state_saved_for_another_modality_order_or_preset_is_refused():
    from multimodal_general.balance import Modality
    from multimodal_general.errors import ConfigurationError

    model, balancer, _ = make_setup(2, preset="stable")
    state = balancer.state_dict()
    assert state["_extra_state"] == {"balancer": "cggm", "modalities": ["m0", "m1"], "preset": "stable"}
    _, paper, _ = make_setup(2, preset="paper")
    with pytest.raises(ConfigurationError, match="saved for"):
        paper.load_state_dict(state)
    reordered = type(balancer)(
        [Modality(n, model.encoders[n], balancer.heads[n], balancer.heads[n][-1]) for n in ("m1", "m0")],
        fused_last_layer=model.last_layer, criterion=balancer.criterion, preset="stable",
    )
    with pytest.raises(ConfigurationError, match="saved for"):
        reordered.load_state_dict(state)


def test_a_loss_module_is_not_part_of_the_balancer_state():
    from torch import nn

    model, balancer, _ = make_setup(2)
    weighted = type(balancer)(
        [m for m in _modalities_of(model, balancer)], fused_last_layer=model.last_layer,
        criterion=nn.CrossEntropyLoss(weight=torch.ones(CLASSES)),
    )
    assert not any("weight" in k and "heads" not in k for k in weighted.state_dict())
    assert sum(p.numel() for p in weighted.parameters()) == sum(p.numel() for p in balancer.parameters())
