"""The branches run as one grouped network compute what they compute one by one."""

import itertools

import pytest
import torch
from torch import nn

from brats_cggm.errors import ConfigurationError
from brats_cggm.network import build_network
from brats_cggm.network.grouped import grouped_forward

SUBSETS = [mask for mask in itertools.product([True, False], repeat=4) if any(mask)]


def twins(fusion: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    separate = build_network("small", fusion=fusion, grouped=False)
    grouped = build_network("small", fusion=fusion, grouped=True)
    grouped.load_state_dict(separate.state_dict())  # one set of parameters, one state dict
    return separate, grouped


@pytest.mark.parametrize("fusion", ["slots", "hemis"])
def test_grouped_branches_match_separate_ones_for_every_subset_and_gradient(fusion):
    separate, grouped = twins(fusion)
    image = torch.randn(len(SUBSETS), 4, 32, 32, 32)
    mask = torch.tensor(SUBSETS)  # all 15 subsets, one per sample
    out_separate, out_grouped = separate(image, mask), grouped(image, mask)
    assert torch.allclose(out_separate, out_grouped, atol=1e-5)
    out_separate.square().mean().backward()
    out_grouped.square().mean().backward()
    for (name, a), b in zip(separate.named_parameters(), grouped.parameters()):
        assert b.grad is not None, name
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    # each sequence's encoder is still its own module (what a balancer scales)
    assert {n for n, _ in grouped.named_parameters()} == {n for n, _ in separate.named_parameters()}


def test_a_switched_off_branch_cannot_change_the_grouped_output():
    _, grouped = twins("slots")
    grouped.eval()
    image = torch.randn(1, 4, 32, 32, 32)
    mask = torch.tensor([[True, False, True, True]])
    changed = image.clone()
    changed[:, 1] = torch.randn(32, 32, 32) * 100
    assert torch.equal(grouped(image, mask), grouped(changed, mask))


def test_grouped_features_are_each_branchs_own():
    separate, grouped = twins("slots")
    image = torch.randn(2, 4, 32, 32, 32)
    _, by_name_separate = separate.forward_with_features(image)
    _, by_name_grouped = grouped.forward_with_features(image)
    for name in separate.modalities:
        for a, b in zip(by_name_separate[name], by_name_grouped[name]):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-5)


def test_branches_of_different_build_are_refused():
    with pytest.raises(ConfigurationError, match="built alike"):
        grouped_forward([nn.Conv3d(1, 2, 3), nn.Identity()], torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ConfigurationError, match="BatchNorm3d"):
        grouped_forward([nn.BatchNorm3d(2), nn.BatchNorm3d(2)], torch.zeros(1, 4, 4, 4, 4))


def test_grouped_network_exports_to_onnx_with_the_same_output(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, grouped = twins("slots")
    grouped.eval()
    image, mask = torch.randn(1, 4, 32, 32, 32), torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    path = tmp_path / "grouped.onnx"
    torch.onnx.export(grouped, (image, mask), path, input_names=["image", "modality_mask"],
                      output_names=["logits"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"image": image.numpy(), "modality_mask": mask.numpy()})
    with torch.no_grad():
        expected = grouped(image, mask).numpy()
    assert abs(onnx_logits - expected).max() < 1e-4
