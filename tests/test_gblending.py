"""G-Blending: known-answer weights, the blended loss, resume, and a harness smoke run."""

import io
import math

import pytest
import torch
from torch import nn

from multimodal_general.balance import BALANCERS, GBlending, Modality, make_balancer
from multimodal_general.balance.gblending import blending_weights
from multimodal_general.errors import ConfigurationError, RegistrationError
from multimodal_general.experiments.imbalance_comparison import compare
from multimodal_general.training.imbalance import TASKS, LateFusionNet, generate
from multimodal_general.training.step import balanced_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_balancer(**options):
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
    heads = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}
    modalities = [Modality(n, encoders[n], heads[n], heads[n]) for n in encoders]
    return encoders, heads, GBlending(modalities, criterion=nn.CrossEntropyLoss(), **options)


# (train, val) at the start and the end of a super-epoch
START = {"fused": (1.0, 1.2), "a": (1.0, 1.1), "b": (1.0, 1.0)}
END = {
    "fused": (0.5, 0.8),  # dG = 0.4, O: 0.2 -> 0.3, dO = 0.1 -> 0.4 / 0.01 = 40
    "a": (0.6, 0.9),  # dG = 0.2, O: 0.1 -> 0.3, dO = 0.2 -> 0.2 / 0.04 = 5
    "b": (0.9, 1.3),  # dG = -0.3, clipped to 0 -> 0
}


def test_known_answer_weights_clip_negative_gain_and_normalise():
    weights = blending_weights(START, END, ("fused", "a", "b"))
    assert weights == pytest.approx([40 / 45, 5 / 45, 0.0])
    assert sum(weights) == pytest.approx(1.0)
    # dO = 0 is guarded by epsilon: that head's weight dominates but stays finite
    flat = {"fused": (0.5, 0.7), "a": (0.6, 0.9), "b": (0.9, 1.3)}
    guarded = blending_weights(START, flat, ("fused", "a", "b"), epsilon=1e-6)
    assert guarded == pytest.approx([0.5e6 / (0.5e6 + 5), 5 / (0.5e6 + 5), 0.0])
    # no head gained: keep the weights
    assert blending_weights(START, START, ("fused", "a", "b")) is None


def test_balancer_starts_uniform_updates_and_keeps_weights_without_gain():
    _, _, balancer = hand_balancer()
    assert torch.allclose(balancer.weights, torch.full((3,), 1 / 3))
    new = balancer.update_from_losses(START, END)
    assert new == pytest.approx({"fused": 40 / 45, "a": 5 / 45, "b": 0.0})
    assert balancer.updates == 1
    assert balancer.update_from_losses(START, START) == pytest.approx(new)
    with pytest.raises(ConfigurationError, match="missing"):
        balancer.update_from_losses({"fused": (1, 1)}, END)
    with pytest.raises(ConfigurationError):
        hand_balancer(super_epoch=0)


def test_loss_term_equals_the_blended_formula_and_reaches_encoders_only_through_w_i():
    encoders, heads, balancer = hand_balancer()
    balancer.update_from_losses(START, END)
    w = balancer.weights.clone()
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    target = torch.tensor([0, 1, 1, 0])
    features = {n: e(inputs[n]) for n, e in encoders.items()}
    output = torch.randn(4, 2, requires_grad=True)
    ce = nn.CrossEntropyLoss()
    task_loss = ce(output, target)
    unimodal = {n: ce(heads[n](features[n]), target) for n in encoders}
    term = balancer._balance_loss(features, output, target, task_loss)
    expected = (w[0] - 1) * task_loss + w[1] * unimodal["a"] + w[2] * unimodal["b"]
    assert torch.allclose(term, expected)
    # the loop's total is the blended loss plus the heads' own (detached) losses
    total = task_loss + balancer.extra_loss(features, output, target, task_loss)
    blended = w[0] * task_loss + w[1] * unimodal["a"] + w[2] * unimodal["b"]
    assert torch.allclose(total, blended + unimodal["a"] + unimodal["b"])
    total.backward()
    # encoder a's gradient is w_a * dL_a/dtheta_a (the fused output here is a free tensor)
    reference = torch.autograd.grad(w[1] * ce(heads["a"](encoders["a"](inputs["a"])), target),
                                    list(encoders["a"].parameters()))
    for p, g in zip(encoders["a"].parameters(), reference):
        assert torch.allclose(p.grad, g, atol=1e-6)
    # heads are trained with weight 1 (the detached copy), as under joint training
    reference = torch.autograd.grad(ce(heads["b"](features["b"].detach()), target), list(heads["b"].parameters()))
    for p, g in zip(heads["b"].parameters(), reference):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert torch.allclose(output.grad, torch.autograd.grad(w[0] * ce(output, target), output)[0])
    with pytest.raises(RegistrationError):
        balancer._balance_loss({"a": features["a"]}, output, target, task_loss)


def make(seed=0):
    torch.manual_seed(seed)
    task = TASKS["cls2"]
    model = LateFusionNet({s.name: task.input_dim for s in task.modalities}, task.out_dim, hidden=16, feature_dim=8)
    heads = {s.name: nn.Linear(8, task.out_dim) for s in task.modalities}
    modalities = [Modality(s.name, model.encoders[s.name], heads[s.name], heads[s.name]) for s in task.modalities]
    balancer = make_balancer("gblending", modalities, criterion=nn.CrossEntropyLoss(), super_epoch=3)
    optimizers = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                  torch.optim.SGD(balancer.parameters(), lr=0.05, momentum=0.9))
    return task, model, balancer, optimizers


def renamed(losses):
    return {{"a": "easy", "b": "slow"}.get(k, k): v for k, v in losses.items()}


def test_registered_and_state_dict_resumes_training_exactly():
    assert BALANCERS["gblending"] is GBlending
    data = generate(TASKS["cls2"], 32 * 8, seed=5)

    def run(model, balancer, optimizers, first, steps):
        for i in range(first, first + steps):
            inputs, target = data.batch(torch.arange(32 * i, 32 * (i + 1)))
            balanced_step(model, balancer, optimizers, nn.CrossEntropyLoss(), inputs, target)

    _, ref_model, ref_balancer, ref_opt = make()
    ref_balancer.update_from_losses(renamed(START), renamed(END))
    run(ref_model, ref_balancer, ref_opt, 0, 8)

    _, model, balancer, opt = make()
    balancer.update_from_losses(renamed(START), renamed(END))
    run(model, balancer, opt, 0, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict(),
                "opt": [o.state_dict() for o in opt]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    _, model, balancer, opt = make(seed=123)
    model.load_state_dict(checkpoint["model"])
    balancer.load_state_dict(checkpoint["balancer"])
    for o, s in zip(opt, checkpoint["opt"]):
        o.load_state_dict(s)
    assert balancer.weight_of("fused") == pytest.approx(40 / 45)
    run(model, balancer, opt, 4, 4)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)
    for (key, a), b in zip(balancer.state_dict().items(), ref_balancer.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    # a state saved with another super_epoch is refused
    _, _, other, _ = make()
    other.super_epoch = 2
    with pytest.raises(ConfigurationError):
        other.load_state_dict(checkpoint["balancer"])


@pytest.mark.parametrize("task", ["cls2", "reg2"])
def test_compare_smoke_run_updates_weights_and_gives_a_finite_test_metric(tmp_path, task):
    outcome = compare(task, ["gblending"], seeds=1, out=tmp_path, epochs=2,
                      train_size=256, val_size=128, test_size=128, plot=False)
    assert not outcome.not_applicable
    row = outcome.rows[0]
    assert row["status"] == "ok"
    assert math.isfinite(row["metric"][0])
