"""Baseline balancers (OGM-GE, modality dropout, MSLR): known answers, resume, errors, smoke runs."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from multimodal_general.balance import (
    BALANCERS,
    MSLR,
    OGMGE,
    BalancerSpec,
    Modality,
    ModalityDropout,
    drop_mask,
    make_balancer,
)
from multimodal_general.balance.ogm_ge import ogm_coefficients
from multimodal_general.errors import ConfigurationError
from multimodal_general.training.imbalance import TASKS, LateFusionNet, RunConfig, build, generate
from multimodal_general.training.step import balanced_step

sigmoid = lambda x: 1 / (1 + math.exp(-x))


def hand_setup(alpha=1.0, ge=False, encoder_shape=(3, 2), **options):
    """Two encoders (only their parameters matter) and a known fused linear layer over [h_a; h_b]."""
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(*encoder_shape), "b": nn.Linear(*encoder_shape)}
    fused = nn.Linear(4, 2)
    with torch.no_grad():
        fused.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        fused.bias.copy_(torch.tensor([0.4, -0.4]))
    modalities = [Modality(n, e) for n, e in encoders.items()]
    balancer = OGMGE(modalities, fused_last_layer=fused, alpha=alpha, ge=ge, **options)
    return encoders, fused, balancer


HAND_FEATURES = {"a": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[0.0, 0.5], [0.0, 1.0]])}
HAND_TARGET = torch.tensor([0, 1])
# contributions W_i h_i + b/2: a -> [2.2, -0.2], [0.2, -0.2]; b -> [0.2, 0.3], [0.2, 0.8]
SCORE_A = (sigmoid(2.4) + sigmoid(-0.4)) / 2
SCORE_B = (sigmoid(-0.1) + sigmoid(0.6)) / 2


def set_grads(encoders, seed=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for encoder in encoders.values():
        for p in encoder.parameters():
            p.grad = scale * torch.randn(p.shape, generator=g)
    return {n: [p.grad.clone() for p in e.parameters()] for n, e in encoders.items()}


def ogm_step(balancer, encoders, seed=3, scale=1.0):
    before = set_grads(encoders, seed, scale)
    balancer.extra_loss(HAND_FEATURES, torch.zeros(2, 2), HAND_TARGET, torch.zeros(()))
    return before, balancer.modulate()


# ------------------------------------------------------------------ OGM-GE
def test_ogm_coefficients_known_answers():
    ratio, k = ogm_coefficients(torch.tensor([0.6, 0.3]), alpha=0.1)
    assert torch.allclose(ratio, torch.tensor([2.0, 0.5]))
    assert torch.allclose(k, torch.tensor([1 - math.tanh(0.1), 1.0]))
    # M = 3: each modality against the mean of the others
    ratio, k = ogm_coefficients(torch.tensor([0.6, 0.3, 0.3]), alpha=0.5)
    assert torch.allclose(ratio, torch.tensor([2.0, 0.3 / 0.45, 0.3 / 0.45]))
    assert torch.allclose(k, torch.tensor([1 - math.tanh(0.5), 1.0, 1.0]))
    _, k = ogm_coefficients(torch.tensor([0.4, 0.4]), alpha=1.0)
    assert torch.equal(k, torch.ones(2))  # balanced: no modulation


def test_ogm_scores_ratio_and_exact_gradient_scaling_without_noise():
    encoders, _, balancer = hand_setup(alpha=1.0, ge=False)
    before, telemetry = ogm_step(balancer, encoders)
    score, ratio, coef = (telemetry.per_modality[k] for k in ("score", "ratio", "coef"))
    assert torch.allclose(score, torch.tensor([SCORE_A, SCORE_B]), atol=1e-6)
    assert torch.allclose(ratio, torch.tensor([SCORE_A / SCORE_B, SCORE_B / SCORE_A]), atol=1e-6)
    expected_k = 1 - math.tanh(SCORE_A / SCORE_B - 1)
    assert torch.allclose(coef, torch.tensor([expected_k, 1.0]), atol=1e-6)
    k_a = float(coef[0])
    for old, p in zip(before["a"], encoders["a"].parameters()):
        assert torch.equal(p.grad, old * k_a)
    for old, p in zip(before["b"], encoders["b"].parameters()):
        assert torch.equal(p.grad, old)

    encoders, by_optimizer = mslr_setup(scales={"a": 0.25}, applied_by_optimizer=True)
    before = set_grads(encoders)
    by_optimizer.extra_loss({}, torch.zeros(1), torch.zeros(1), torch.zeros(()))
    assert torch.equal(by_optimizer.modulate().per_modality["scale"], torch.tensor([0.25, 1.0]))
    for name in ("a", "b"):  # the scales are reported, the gradients untouched
        for old, p in zip(before[name], encoders[name].parameters()):
            assert torch.equal(p.grad, old)
    assert set(telemetry.as_dict()) >= {"score/a", "ratio/b", "coef/a", "grad_norm/a"}


def test_ogm_scores_accumulate_over_micro_batches():
    encoders, _, balancer = hand_setup(accumulation_steps=2)
    set_grads(encoders)
    for i in range(2):
        features = {n: f[i : i + 1] for n, f in HAND_FEATURES.items()}
        balancer.extra_loss(features, torch.zeros(1, 2), HAND_TARGET[i : i + 1], torch.zeros(()))
    telemetry = balancer.modulate()
    assert torch.allclose(telemetry.per_modality["score"], torch.tensor([SCORE_A, SCORE_B]), atol=1e-6)


def test_ge_noise_has_the_gradient_std_touches_only_the_dominant_modality_and_is_reproducible():
    def noisy_step(balancer, encoders):
        before, telemetry = ogm_step(balancer, encoders, scale=3.0)
        k = float(telemetry.per_modality["coef"][0])
        noise = [p.grad - old * k for old, p in zip(before["a"], encoders["a"].parameters())]
        for old, p in zip(before["b"], encoders["b"].parameters()):
            assert torch.equal(p.grad, old)
        return before, noise

    encoders, _, balancer = hand_setup(ge=True, encoder_shape=(200, 100))
    before, noise = noisy_step(balancer, encoders)
    for old, n in zip(before["a"], noise):
        assert n.abs().sum() > 0
        assert abs(float(n.std()) / float(old.std()) - 1) < 0.2
    assert abs(float(noise[0].std()) / float(before["a"][0].std()) - 1) < 0.02  # 20000 entries
    # the same step of an identically built balancer draws the same noise
    encoders2, _, balancer2 = hand_setup(ge=True, encoder_shape=(200, 100))
    _, noise2 = noisy_step(balancer2, encoders2)
    assert all(torch.equal(x, y) for x, y in zip(noise, noise2))
    # the next step draws other noise; a balancer resumed from the state draws that same noise
    state = copy.deepcopy(balancer.state_dict())  # state_dict shares the live buffers
    _, next_noise = noisy_step(balancer, encoders)
    assert not torch.equal(next_noise[0], noise[0])
    encoders3, _, resumed = hand_setup(ge=True, encoder_shape=(200, 100))
    resumed.load_state_dict(state)
    _, resumed_noise = noisy_step(resumed, encoders3)
    assert all(torch.equal(x, y) for x, y in zip(next_noise, resumed_noise))


def test_ogm_rejects_non_classification_targets_and_wrong_fused_layers():
    encoders, fused, balancer = hand_setup()
    with pytest.raises(ConfigurationError, match="ogm_ge supports classification tasks"):
        balancer.extra_loss(HAND_FEATURES, torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(()))
    modalities = [Modality(n, e) for n, e in encoders.items()]
    with pytest.raises(ConfigurationError, match="nn.Linear"):
        OGMGE(modalities, fused_last_layer=fused.weight)
    # LateFusionNet's last layer reads the head's hidden layer, not the concatenated features
    model = LateFusionNet({"a": 5, "b": 5}, 3, hidden=8, feature_dim=4)
    ogm = OGMGE([Modality(n, model.encoders[n]) for n in ("a", "b")], fused_last_layer=model.last_layer)
    inputs = {"a": torch.randn(4, 5), "b": torch.randn(4, 5)}
    output, features = model(inputs)
    with pytest.raises(ConfigurationError, match="concatenated"):
        ogm.extra_loss(features, output, torch.zeros(4, dtype=torch.long), output.sum())
    with pytest.raises(ConfigurationError, match="concatenated"):
        # the imbalance task's two-layer fused head, when asked for explicitly (its default
        # "auto" gives ogm_ge a linear fused head; see tests/test_compare.py)
        config = RunConfig(task="cls2", balancer=BalancerSpec("ogm_ge"), train_size=64, val_size=64, fusion_head="mlp")
        model, ogm, criterion = build(config)
        batch = generate(TASKS["cls2"], 8, seed=0)
        balanced_step(model, ogm, (torch.optim.SGD(model.parameters(), lr=0.1),), criterion,
                      batch.inputs, batch.target)


# ------------------------------------------------------- modality dropout
def test_drop_mask_never_drops_every_modality_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    mask = drop_mask(5000, ["a", "b", "c"], 0.6, g)
    assert mask.shape == (5000, 3) and mask.dtype == torch.bool
    assert mask.any(dim=1).all()
    # drop rate: p, except for the rescued samples (p^3 of them get one modality back)
    expected_kept = (1 - 0.6) + 0.6**3 / 3
    assert abs(float(mask.float().mean()) - expected_kept) < 0.02
    assert torch.equal(mask, drop_mask(5000, 3, 0.6, torch.Generator().manual_seed(0)))
    assert drop_mask(10, 2, 0.0).all()
    with pytest.raises(ConfigurationError, match=r"\[0, 1\)"):
        drop_mask(4, 2, 1.0)


def test_modality_dropout_zeroes_features_and_refuses_a_loop_that_does_not_drop():
    model = LateFusionNet({"a": 5, "b": 5}, 3, hidden=8, feature_dim=4)
    modalities = [Modality(n, model.encoders[n]) for n in ("a", "b")]
    balancer = ModalityDropout(modalities, drop_probability=0.5)
    features = {"a": torch.ones(64, 4), "b": 2 * torch.ones(64, 4)}
    dropped = balancer.drop_features(features)
    state_before = copy.deepcopy(balancer.state_dict())
    keep_a = dropped["a"][:, 0] != 0
    keep_b = dropped["b"][:, 0] != 0
    assert (keep_a | keep_b).all() and not keep_a.all() and not keep_b.all()
    assert torch.equal(dropped["b"][keep_b], features["b"][keep_b])
    out = torch.zeros(64, 3)
    balancer.extra_loss(dropped, out, torch.zeros(64, dtype=torch.long), out.sum())
    telemetry = balancer.modulate()
    assert torch.allclose(telemetry.per_modality["kept"], torch.stack([keep_a, keep_b]).float().mean(1))
    # the next step without drop_features is an error, not silent joint training
    with pytest.raises(ConfigurationError, match="drop_features"):
        balancer.extra_loss(features, out, torch.zeros(64, dtype=torch.long), out.sum())
    # a resumed balancer draws the same masks as the original did at that step
    resumed = ModalityDropout(modalities, drop_probability=0.5)
    resumed.load_state_dict(state_before)
    assert torch.equal(resumed.drop_features(features)["a"], dropped["a"])
    # a model that drops through its own mask: nothing to do in the loop
    by_model = ModalityDropout(modalities, applied_by_model=True)
    by_model.extra_loss(features, out, torch.zeros(64, dtype=torch.long), out.sum())
    assert by_model.modulate().scalars["drop_probability"] == 0.25


# ------------------------------------------------------------------- MSLR
def mslr_setup(**options):
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
    return encoders, MSLR([Modality(n, e) for n, e in encoders.items()], **options)


def test_mslr_scales_gradients_exactly_and_equals_a_learning_rate_for_sgd():
    encoders, balancer = mslr_setup(scales={"a": 0.25})
    before = set_grads(encoders)
    balancer.extra_loss({}, torch.zeros(1), torch.zeros(1), torch.zeros(()))
    telemetry = balancer.modulate()
    assert torch.equal(telemetry.per_modality["scale"], torch.tensor([0.25, 1.0]))
    for old, p in zip(before["a"], encoders["a"].parameters()):
        assert torch.equal(p.grad, old * 0.25)
    for old, p in zip(before["b"], encoders["b"].parameters()):
        assert torch.equal(p.grad, old)

    # three SGD-with-momentum steps: scaled gradients == per-encoder learning rates
    def train(use_groups):
        encoders, balancer = mslr_setup(scales={"a": 0.25, "b": 2.0}, applied_by_optimizer=use_groups)
        if use_groups:  # the groups apply the scales; the balancer leaves gradients alone
            optimizer = torch.optim.SGD(balancer.param_groups(0.1), lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.SGD([p for e in encoders.values() for p in e.parameters()], lr=0.1, momentum=0.9)
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            optimizer.zero_grad()
            loss = sum((e(x) ** 2).mean() for e in encoders.values())
            loss.backward()
            balancer.extra_loss({}, torch.zeros(1), torch.zeros(1), loss)
            balancer.modulate()
            optimizer.step()
        return [p.detach().clone() for e in encoders.values() for p in e.parameters()]

    for x, y in zip(train(False), train(True)):
        assert torch.allclose(x, y, atol=1e-6)


def balancer_modalities(encoders):
    return [Modality(n, e) for n, e in encoders.items()]


def test_mslr_adapts_from_validation_and_resumes():
    _, balancer = mslr_setup(scales={"a": 2.0}, decay=0.5)
    assert balancer.update_from_validation({"a": 0.5, "b": 0.6}) == {"a": 2.0, "b": 1.0}
    assert balancer.update_from_validation({"a": 0.5, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert balancer.update_from_validation({"a": 0.4, "b": 0.6}) == {"a": 0.5, "b": 0.5}
    _, resumed = mslr_setup()
    resumed.load_state_dict(balancer.state_dict())
    assert resumed.update_from_validation({"a": 0.55, "b": 0.6}) == {"a": 0.5, "b": 0.25}
    with pytest.raises(ConfigurationError, match="missing"):
        resumed.update_from_validation({"a": 0.1})
    with pytest.raises(ConfigurationError, match="unknown modalities"):
        mslr_setup(scales={"video": 0.5})
    with pytest.raises(ConfigurationError, match="> 0"):
        mslr_setup(scales={"a": 0.0})


# -------------------------------------------------------- registry, resume, smoke
def test_new_balancers_are_registered_and_options_are_filtered():
    assert {"none", "cggm", "ogm_ge", "modality_dropout", "mslr"} <= set(BALANCERS)
    encoders, fused, _ = hand_setup()
    modalities = balancer_modalities(encoders)
    common = {"fused_last_layer": fused, "rho": 1.2, "lam": 0.1, "alpha": 0.3, "scales": {"a": 0.5}, "drop_probability": 0.1}
    assert make_balancer("ogm_ge", modalities, **common).alpha == 0.3
    assert make_balancer("mslr", modalities, **common).scale_of("a") == 0.5
    assert make_balancer("modality_dropout", modalities, **common).drop_probability == 0.1


def linear_fusion_model(task_name):
    """LateFusionNet with a single linear fused head over the concatenated features."""
    task = TASKS[task_name]
    model = LateFusionNet({s.name: task.input_dim for s in task.modalities}, task.out_dim, hidden=32, feature_dim=16)
    model.head = nn.Sequential(nn.Linear(16 * len(task.modalities), task.out_dim))
    return task, model


def make_method(method, task_name, seed=0):
    torch.manual_seed(seed)
    task, model = linear_fusion_model(task_name)
    modalities = [Modality(s.name, model.encoders[s.name]) for s in task.modalities]
    criterion = nn.CrossEntropyLoss() if task.kind == "classification" else nn.MSELoss()
    options = {
        "ogm_ge": {"fused_last_layer": model.last_layer, "alpha": 0.5},
        "mslr": {"scales": {"easy": 0.5}},
        "modality_dropout": {"drop_probability": 0.3},
    }[method]
    balancer = make_balancer(method, modalities, criterion=criterion, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return task, model, balancer, criterion, optimizer


def step(model, balancer, criterion, optimizer, inputs, target):
    if not isinstance(balancer, ModalityDropout):
        return balanced_step(model, balancer, (optimizer,), criterion, inputs, target)
    optimizer.zero_grad(set_to_none=True)
    features = balancer.drop_features({n: e(inputs[n]) for n, e in model.encoders.items()})
    output = model.head(torch.cat(list(features.values()), dim=1))
    task_loss = criterion(output, target)
    (task_loss + balancer.extra_loss(features, output, target, task_loss)).backward()
    telemetry = balancer.modulate()
    optimizer.step()
    return task_loss.detach(), telemetry


SMOKE = [
    ("ogm_ge", "cls2", ("score", "ratio", "coef")),
    ("ogm_ge", "cls3", ("score", "ratio", "coef")),
    ("mslr", "cls2", ("scale",)),
    ("mslr", "reg2", ("scale",)),
    ("modality_dropout", "cls3", ("kept",)),
    ("modality_dropout", "reg2", ("kept",)),
]


@pytest.mark.parametrize(("method", "task_name", "keys"), SMOKE)
def test_smoke_run_on_the_synthetic_imbalance_task(method, task_name, keys):
    task, model, balancer, criterion, optimizer = make_method(method, task_name)
    data = generate(task, 192, seed=0)
    losses = []
    for start in range(0, 192, 32):
        inputs, target = data.batch(torch.arange(start, start + 32))
        loss, telemetry = step(model, balancer, criterion, optimizer, inputs, target)
        losses.append(float(loss))
        row = telemetry.as_dict()
        for key in (*keys, "grad_norm"):
            for spec in task.modalities:
                assert math.isfinite(row[f"{key}/{spec.name}"]), (key, spec.name)
    assert all(math.isfinite(x) for x in losses)
    assert int(balancer.step_count) == 6


@pytest.mark.parametrize("method", ["ogm_ge", "mslr", "modality_dropout"])
def test_state_dict_round_trip_resumes_training_exactly(method):
    task_name = "cls2"

    def run(model, balancer, criterion, optimizer, steps, first=0):
        data = generate(TASKS[task_name], 32 * 8, seed=5)
        for i in range(first, first + steps):
            inputs, target = data.batch(torch.arange(32 * i, 32 * (i + 1)))
            step(model, balancer, criterion, optimizer, inputs, target)

    *_, ref_model, ref_balancer, criterion, ref_optimizer = make_method(method, task_name)
    run(ref_model, ref_balancer, criterion, ref_optimizer, 8)

    _, model, balancer, criterion, optimizer = make_method(method, task_name)
    run(model, balancer, criterion, optimizer, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict(),
                "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    _, model, balancer, criterion, optimizer = make_method(method, task_name, seed=123)
    model.load_state_dict(checkpoint["model"])
    balancer.load_state_dict(checkpoint["balancer"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    run(model, balancer, criterion, optimizer, 4, first=4)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)
    for (key, a), b in zip(balancer.state_dict().items(), ref_balancer.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
