"""MMPareto and AGM: known answers on hand-built gradients and scores, resume, smoke runs."""

import io
import math

import pytest
import torch
from conftest import CLASSES, FEATURES, make_batch
from torch import nn

from multimodal_general.balance import Modality
from multimodal_general.balance.agm import AGM, agm_coefficients, concat_unimodal_output
from multimodal_general.balance.mmpareto import MMPareto, pareto_combine, pareto_weights
from multimodal_general.errors import ConfigurationError, RegistrationError
from multimodal_general.training.imbalance import TASKS, LateFusionNet, generate, unimodal_head
from multimodal_general.training.step import balanced_step


def make_model(m, seed=0):
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    model = LateFusionNet({n: 5 for n in names}, CLASSES, hidden=16, feature_dim=FEATURES)
    return model, names


def make_mmpareto(m=2, seed=0, **options):
    model, names = make_model(m, seed)
    criterion = nn.CrossEntropyLoss()
    modalities = []
    for n in names:
        head = unimodal_head(FEATURES, CLASSES)
        modalities.append(Modality(n, model.encoders[n], head, head[-1]))
    return model, MMPareto(modalities, criterion=criterion, **options), criterion


def make_agm(m=2, seed=0, unimodal_output=None, **options):
    model, names = make_model(m, seed)
    criterion = nn.CrossEntropyLoss()
    modalities = [Modality(n, model.encoders[n]) for n in names]
    if unimodal_output is None:
        unimodal_output = concat_unimodal_output(model.head, names)
    return model, AGM(modalities, unimodal_output=unimodal_output, **options), criterion


def optimizers_for(model, balancer, lr=0.05):
    opts = [torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)]
    if list(balancer.parameters()):
        opts.append(torch.optim.SGD(balancer.parameters(), lr=lr, momentum=0.9))
    return tuple(opts)


# ------------------------------------------------------------------ MMPareto: known answers
def test_agreeing_gradients_get_equal_weights_and_the_plain_sum():
    g_m, g_u = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    cos, a_m, a_u = pareto_weights(g_m, g_u)
    assert float(cos) == pytest.approx(1 / math.sqrt(2))
    assert float(a_m) == float(a_u) == 0.5
    g, info = pareto_combine(g_m, g_u)
    assert torch.allclose(g, g_m + g_u)
    assert float(info["scale"]) == 1.0


def test_conflicting_gradients_get_min_norm_weights_and_the_paper_magnitude():
    g_m, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    cos, a_m, a_u = pareto_weights(g_m, g_u)
    assert float(cos) < 0
    # by hand: g_m - g_u = [2, -2]; (g_m - g_u).g_m = 2; ||g_m - g_u||^2 = 8
    assert float(a_u) == pytest.approx(0.25)
    assert float(a_m) == pytest.approx(0.75)
    plain, info = pareto_combine(g_m, g_u, rescale=False)
    assert torch.allclose(plain, torch.tensor([1.0, 1.0]))  # 2 (0.75 g_m + 0.25 g_u)
    g, info = pareto_combine(g_m, g_u)
    # rescaled to ||g_m + g_u|| = ||[0, 2]|| = 2
    assert torch.allclose(g, torch.tensor([math.sqrt(2), math.sqrt(2)]))
    assert float(info["scale"]) == pytest.approx(math.sqrt(2))
    assert float(g @ g_m) >= 0 and float(g @ g_u) >= 0


def test_conflict_weights_are_the_min_norm_point_of_the_segment():
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    checked = 0
    for _ in range(50):
        g_m, g_u = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
        g_u = g_u * torch.rand((), generator=gen, dtype=torch.float64) * 3
        if float(g_m @ g_u) >= 0:
            continue
        checked += 1
        _, _, a_u = pareto_weights(g_m, g_u)
        norms = ((1 - grid)[:, None] * g_m + grid[:, None] * g_u).norm(dim=1)
        assert float(a_u) == pytest.approx(float(grid[norms.argmin()]), abs=1e-4)
        g, _ = pareto_combine(g_m, g_u, rescale=False)
        assert float(g @ g_m) >= -1e-12 and float(g @ g_u) >= -1e-12
        assert float(pareto_combine(g_m, g_u)[0].norm()) >= float((g_m + g_u).norm()) - 1e-9
    assert checked > 10


def test_zero_gradient_counts_as_agreement():
    cos, _, a_u = pareto_weights(torch.zeros(3), torch.ones(3))
    assert float(cos) == 0 and float(a_u) == 0.5


# ------------------------------------------------------------------ MMPareto: in a step
def reference_gradients(model, balancer, criterion, inputs, target, name):
    """g_m and g_u of one encoder, computed independently of the balancer."""
    params = list(model.encoders[name].parameters())
    output, features = model(inputs)
    g_m = torch.autograd.grad(criterion(output, target), params, retain_graph=True)
    g_u = torch.autograd.grad(criterion(balancer.heads[name](features[name]), target), params)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])
    return flat(g_m), flat(g_u)


def test_step_replaces_encoder_gradients_with_the_pareto_combination():
    model, balancer, criterion = make_mmpareto(3)
    inputs, target = make_batch(3, n=16)
    expected = {
        n: pareto_combine(*reference_gradients(model, balancer, criterion, inputs, target, n))
        for n in balancer.modality_names
    }
    output, features = model(inputs)
    task_loss = criterion(output, target)
    (task_loss + balancer.extra_loss(features, output, target, task_loss)).backward()
    fused_before = [p.grad.clone() for p in model.head.parameters()]
    heads_before = [p.grad.clone() for p in balancer.parameters()]
    telemetry = balancer.modulate()
    for i, name in enumerate(balancer.modality_names):
        got = torch.cat([p.grad.reshape(-1) for p in model.encoders[name].parameters()])
        g, info = expected[name]
        assert torch.allclose(got, g, atol=1e-6), name
        assert float(telemetry.per_modality["cos"][i]) == pytest.approx(float(info["cos"]), abs=1e-5)
        assert float(telemetry.per_modality["alpha_u"][i]) == pytest.approx(float(info["alpha_u"]), abs=1e-5)
    for old, p in zip(fused_before, model.head.parameters()):
        assert torch.equal(p.grad, old)  # the fused head is not an encoder
    for old, p in zip(heads_before, balancer.parameters()):
        assert torch.equal(p.grad, old)  # heads still learn from their own loss only
    assert set(telemetry.as_dict()) >= {"cos/m0", "alpha_u/m2", "eps/m1"}


def test_accumulation_of_two_halves_equals_the_full_batch():
    inputs, target = make_batch(2, n=16)
    model, balancer, criterion = make_mmpareto(2)
    output, features = model(inputs)
    loss = criterion(output, target)
    (loss + balancer.extra_loss(features, output, target, loss)).backward()
    balancer.modulate()
    full = [p.grad.clone() for p in model.encoders.parameters()]

    model, balancer, criterion = make_mmpareto(2, accumulation_steps=2)
    for half in (slice(0, 8), slice(8, 16)):
        x, y = {k: v[half] for k, v in inputs.items()}, target[half]
        output, features = model(x)
        loss = criterion(output, y)
        ((loss + balancer.extra_loss(features, output, y, loss)) / 2).backward()
    balancer.modulate()
    for old, p in zip(full, model.encoders.parameters()):
        assert torch.allclose(p.grad, old, atol=1e-6)


def test_mmpareto_needs_heads():
    model, names = make_model(2)
    with pytest.raises(RegistrationError):
        MMPareto([Modality(n, model.encoders[n]) for n in names], criterion=nn.CrossEntropyLoss())


# ------------------------------------------------------------------ AGM: known answers
def test_agm_coefficients_by_hand():
    ratio, k = agm_coefficients(torch.tensor([0.6, 0.2]), 0.1)
    assert torch.allclose(ratio, torch.tensor([1.5, 0.5]))
    assert torch.allclose(k, torch.tensor([math.exp(-0.05), math.exp(0.05)]))
    ratio, k = agm_coefficients(torch.tensor([0.3, 0.3, 0.3]), 0.5)
    assert torch.allclose(k, torch.ones(3))
    _, k = agm_coefficients(torch.tensor([0.9, 0.1]), 10.0)  # exp(-8), exp(8): clamped
    assert torch.allclose(k, torch.tensor([0.1, 10.0]))


def fixed_probability_output(probabilities):
    """unimodal_output whose response gives the true class probability p_keep to every sample."""
    state = {}

    def unimodal_output(features, keep):
        target = state["target"]
        p = probabilities[keep]
        rows = torch.full((len(target), CLASSES), (1 - p) / (CLASSES - 1))
        rows[torch.arange(len(target)), target] = p
        return rows.log()

    return unimodal_output, state


def test_agm_step_scores_ema_and_gradient_scaling_by_hand():
    probabilities = {"m0": 0.8, "m1": 0.4}
    unimodal_output, state = fixed_probability_output(probabilities)
    model, balancer, criterion = make_agm(2, unimodal_output=unimodal_output, alpha=0.5, momentum=0.5)
    inputs, target = make_batch(2, n=8)
    state["target"] = target
    strengths = []
    for step, new in enumerate(({"m0": 0.8, "m1": 0.4}, {"m0": 0.6, "m1": 0.6})):
        probabilities.update(new)
        model.zero_grad()
        output, features = model(inputs)
        loss = criterion(output, target)
        (loss + balancer.extra_loss(features, output, target, loss)).backward()
        before = {n: [p.grad.clone() for p in model.encoders[n].parameters()] for n in balancer.modality_names}
        telemetry = balancer.modulate()
        assert torch.allclose(telemetry.per_modality["score"], torch.tensor([new["m0"], new["m1"]]), atol=1e-6)
        strengths.append(telemetry.per_modality["strength"])
        k = telemetry.per_modality["coef"]
        for i, n in enumerate(balancer.modality_names):
            for old, p in zip(before[n], model.encoders[n].parameters()):
                assert torch.allclose(p.grad, old * k[i])
    # step 1: s = score; step 2: s = 0.5 s + 0.5 score
    assert torch.allclose(strengths[0], torch.tensor([0.8, 0.4]), atol=1e-6)
    assert torch.allclose(strengths[1], torch.tensor([0.7, 0.5]), atol=1e-6)
    ratio = torch.tensor([0.7, 0.5]) / 0.6
    assert torch.allclose(k, torch.exp(0.5 * (1 - ratio)), atol=1e-6)
    assert float(k[0]) < 1 < float(k[1])  # the stronger modality is slowed down


def test_concat_unimodal_output_zeros_the_other_modalities():
    model, names = make_model(3)
    inputs, _ = make_batch(3)
    _, features = model(inputs)
    out = concat_unimodal_output(model.head, names)(features, "m1")
    h = features["m1"]
    expected = model.head(torch.cat([torch.zeros_like(h), h, torch.zeros_like(h)], 1))
    assert torch.equal(out, expected)


def test_agm_refuses_anything_but_classification():
    with pytest.raises(ConfigurationError, match="classification"):
        make_agm(2, task_kind="regression")
    model, balancer, _ = make_agm(2)
    inputs, _ = make_batch(2)
    output, features = model(inputs)
    regression_target = torch.randn(len(output), 1)
    out1 = output[:, :1]
    with pytest.raises(ConfigurationError, match="classification"):
        balancer.extra_loss(features, out1, regression_target, (out1 - regression_target).pow(2).mean())


# ------------------------------------------------------------------ resume, both methods
def run_steps(model, balancer, criterion, optimizers, steps, seed):
    rows = []
    for s in range(steps):
        inputs, target = make_batch(len(balancer.modality_names), n=16, seed=seed + s)
        _, telemetry = balanced_step(model, balancer, optimizers, criterion, inputs, target)
        rows.append(telemetry.as_dict())
    return rows


@pytest.mark.parametrize("make", [make_mmpareto, make_agm])
def test_resume_from_state_dict_is_exact(make):
    model, balancer, criterion = make(2)
    optimizers = optimizers_for(model, balancer)
    run_steps(model, balancer, criterion, optimizers, 3, seed=10)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "balancer": balancer.state_dict(),
         "optimizers": [o.state_dict() for o in optimizers]},
        buffer,
    )
    reference = run_steps(model, balancer, criterion, optimizers, 3, seed=20)
    reference_params = [p.detach().clone() for p in model.parameters()]

    model2, balancer2, criterion2 = make(2, seed=123)  # different initial weights
    optimizers2 = optimizers_for(model2, balancer2)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2.load_state_dict(saved["model"])
    balancer2.load_state_dict(saved["balancer"])
    for o, s in zip(optimizers2, saved["optimizers"]):
        o.load_state_dict(s)
    resumed = run_steps(model2, balancer2, criterion2, optimizers2, 3, seed=20)
    assert resumed == reference
    for a, b in zip(reference_params, model2.parameters()):
        assert torch.equal(a, b)
    if isinstance(balancer, AGM):
        assert {"strength", "strength_ready"} <= set(balancer.state_dict())


def test_state_of_another_balancer_is_refused():
    _, pareto, _ = make_mmpareto(2)
    _, agm, _ = make_agm(2)
    with pytest.raises(ConfigurationError):
        agm.load_state_dict({**agm.state_dict(), "_extra_state": pareto.get_extra_state()})


# ------------------------------------------------------------------ smoke on the imbalance task
@pytest.mark.parametrize("method", ["mmpareto", "agm"])
@pytest.mark.parametrize("task_name", ["cls2", "cls3"])
def test_smoke_on_the_imbalance_task(method, task_name):
    task = TASKS[task_name]
    torch.manual_seed(0)
    data = generate(task, 256, seed=0)
    names = [s.name for s in task.modalities]
    model = LateFusionNet({n: task.input_dim for n in names}, task.out_dim)
    criterion = nn.CrossEntropyLoss()
    if method == "mmpareto":
        heads = {n: unimodal_head(32, task.out_dim) for n in names}
        balancer = MMPareto([Modality(n, model.encoders[n], heads[n], heads[n][-1]) for n in names],
                            criterion=criterion)
    else:
        balancer = AGM([Modality(n, model.encoders[n]) for n in names],
                       unimodal_output=concat_unimodal_output(model.head, names))
    optimizers = optimizers_for(model, balancer)
    losses = []
    for start in range(0, 256, 32):
        inputs, target = data.batch(torch.arange(start, start + 32))
        loss, telemetry = balanced_step(model, balancer, optimizers, criterion, inputs, target)
        losses.append(float(loss))
        row = telemetry.as_dict()
        assert all(math.isfinite(v) for v in row.values()), row
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if method == "agm":
        assert {f"coef/{n}" for n in names} <= set(row) and {f"strength/{n}" for n in names} <= set(row)
    else:
        assert {f"cos/{n}" for n in names} <= set(row)

