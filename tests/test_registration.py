"""Registration mistakes fail at construction with a clear message."""

import pytest
import torch
from conftest import CLASSES, FEATURES, make_batch, make_setup
from torch import nn

from multimodal_general.balance import CGGM, Modality, make_balancer
from multimodal_general.errors import ConfigurationError, RegistrationError
from multimodal_general.training.imbalance import LateFusionNet, unimodal_head


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LateFusionNet({"a": 5, "b": 5}, CLASSES, hidden=16, feature_dim=FEATURES)


def modality(model, name, head=None, last=None):
    head = head if head is not None else unimodal_head(FEATURES, CLASSES)
    return Modality(name, model.encoders[name], head, last if last is not None else head[-1])


def cggm(modalities, model, **options):
    return CGGM(modalities, fused_last_layer=model.last_layer, criterion=nn.CrossEntropyLoss(), **options)


def test_a_head_predicting_another_shape_is_rejected(model):
    wrong = unimodal_head(FEATURES, CLASSES + 2)
    with pytest.raises(RegistrationError, match=r"modality 'b'.*\(5, 32\).*\(3, 32\)"):
        cggm([modality(model, "a"), modality(model, "b", wrong)], model)


def test_a_parameter_in_two_encoders_is_rejected(model):
    shared = Modality("b", nn.Sequential(model.encoders["a"][0], nn.Linear(3, 3)), *_head())
    with pytest.raises(RegistrationError, match="encoders of both 'a' and 'b'"):
        cggm([modality(model, "a"), shared], model)


def test_an_encoder_without_parameters_is_rejected(model):
    with pytest.raises(RegistrationError, match="encoder of modality 'b' has no parameters"):
        cggm([modality(model, "a"), Modality("b", nn.ReLU(), *_head())], model)


def test_duplicate_names_and_a_single_modality_are_rejected(model):
    with pytest.raises(RegistrationError, match="repeated: \\['a'\\]"):
        cggm([modality(model, "a"), Modality("a", model.encoders["b"], *_head())], model)
    with pytest.raises(RegistrationError, match="at least 2 modalities"):
        cggm([modality(model, "a")], model)


def test_a_missing_head_or_a_last_layer_outside_the_head_is_rejected(model):
    with pytest.raises(RegistrationError, match="modality 'b' needs a head"):
        cggm([modality(model, "a"), Modality("b", model.encoders["b"])], model)
    stray = nn.Linear(FEATURES, CLASSES)
    with pytest.raises(RegistrationError, match="head_last_layer of modality 'b' is not part of its head"):
        cggm([modality(model, "a"), modality(model, "b", last=stray)], model)


def test_the_fused_layer_must_not_be_inside_an_encoder(model):
    with pytest.raises(RegistrationError, match="fused_last_layer is inside the encoder of 'a'"):
        CGGM(
            [modality(model, "a"), modality(model, "b")],
            fused_last_layer=model.encoders["a"][0][0], criterion=nn.CrossEntropyLoss(),
        )


def test_a_head_sharing_an_encoder_parameter_is_rejected(model):
    head = nn.Sequential(model.encoders["a"][0][0], nn.Linear(16, CLASSES))
    with pytest.raises(RegistrationError, match="head of modality 'b' shares a parameter"):
        make_balancer("none", [modality(model, "a"), modality(model, "b", head, head[-1])],
                      criterion=nn.CrossEntropyLoss())


def test_a_head_output_that_differs_from_the_fused_output_is_reported_at_the_first_step(model):
    class Unflattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(FEATURES, CLASSES)

        def forward(self, h):
            return self.fc(h).unsqueeze(1)

    head = Unflattened()
    balancer = cggm([modality(model, "a"), Modality("b", model.encoders["b"], head, head.fc)], model)
    inputs, target = make_batch(2)
    inputs = {"a": inputs["m0"], "b": inputs["m1"]}
    output, features = model(inputs)
    with pytest.raises(RegistrationError, match=r"head of modality 'b' predicts shape \(8, 1, 3\)"):
        balancer.extra_loss(features, output, target, nn.functional.cross_entropy(output, target))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: make_balancer("gradnorm", m), "unknown balancer 'gradnorm'"),
        (lambda m: make_balancer("none", m, rhoo=1.0), r"unknown balancer option\(s\): \['rhoo'\]"),
        (lambda m: make_setup(2, preset="fast"), "unknown CGGM preset 'fast'"),
        (lambda m: make_setup(2, rho=0.0), "rho > 0"),
        (lambda m: make_setup(2, metric="f1"), "unknown utilization metric 'f1'"),
        (lambda m: make_setup(2, accumulation_steps=0), "accumulation_steps must be >= 1"),
    ],
)
def test_bad_options_name_the_problem(model, call, message):
    with pytest.raises(ConfigurationError, match=message):
        call([modality(model, "a"), modality(model, "b")])


def _head():
    head = unimodal_head(FEATURES, CLASSES)
    return head, head[-1]
