"""The three fusions of the multi-branch network: masking invariance, any subset of
sequences, shapes, known answers, and ONNX export of each."""

import itertools

import pytest
import torch

from brats_cggm import MODALITIES
from brats_cggm.errors import ConfigurationError
from brats_cggm.network import MultiBranchUNet
from brats_cggm.network.fusion import (
    FUSIONS,
    BranchAttentionFusion,
    MeanVarianceFusion,
    make_fusion,
    masked_moments,
)

TINY = {"channels": (4, 8, 16), "strides": (2, 2, 2), "num_res_units": 1, "head_channels": 4}
#: every non-empty subset of the four sequences, as a mask row
SUBSETS = [row for row in itertools.product((0, 1), repeat=4) if any(row)]


def tiny(fusion: str) -> MultiBranchUNet:
    torch.manual_seed(0)
    return MultiBranchUNet(**TINY, fusion=fusion).eval()


def image(n=2, shape=(16, 16, 16), seed=1) -> torch.Tensor:
    return torch.randn(n, len(MODALITIES), *shape, generator=torch.Generator().manual_seed(seed))


def branch_features(values, shape=(1, 2, 2, 2, 2)):
    return [torch.full(shape, float(v)) for v in values]


def test_moments_are_over_the_present_branches_only():
    features = branch_features([1.0, 3.0, 100.0, float("nan")])
    keep = torch.tensor([[True, True, False, False]])
    mean, variance = masked_moments(features, keep)
    assert torch.equal(mean, torch.full_like(mean, 2.0))
    assert torch.equal(variance, torch.full_like(variance, 1.0))  # ((1-2)^2 + (3-2)^2) / 2


def test_hemis_mixes_mean_and_variance_with_one_convolution():
    fusion = MeanVarianceFusion(channels=2)
    with torch.no_grad():
        fusion.mix.weight.zero_()
        fusion.mix.bias.zero_()
        fusion.mix.weight[0, 0] = 1.0  # channel 0 <- mean of channel 0
        fusion.mix.weight[1, 2] = 1.0  # channel 1 <- variance of channel 0
    fused = fusion(branch_features([2.0, 4.0, 6.0, 8.0]), torch.tensor([[True, False, True, False]]))
    assert torch.allclose(fused[:, 0], torch.full_like(fused[:, 0], 4.0))
    assert torch.allclose(fused[:, 1], torch.full_like(fused[:, 1], 4.0))  # ((2-4)^2 + (6-4)^2) / 2


def test_attention_weights_are_a_softmax_over_the_switched_on_branches():
    torch.manual_seed(0)
    fusion = BranchAttentionFusion(channels=2, branches=4)
    features = [torch.randn(3, 2, 2, 3, 2) for _ in range(4)]
    keep = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    weights = fusion.weights(features, keep)
    assert weights.shape == (3, 4, 2, 3, 2)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 2, 3, 2))
    assert torch.equal(weights[~keep], torch.zeros_like(weights[~keep]))
    assert torch.equal(weights[2, 2], torch.ones(2, 3, 2))  # one branch on: all its weight
    torch.testing.assert_close(fusion(features, keep)[2], features[2][2])


@pytest.mark.parametrize("name", FUSIONS)
def test_every_fusion_ignores_a_switched_off_branch_even_if_it_is_nan(name):
    torch.manual_seed(0)
    fusion = make_fusion(name, channels=2, branches=4)
    features = [torch.randn(2, 2, 2, 2, 2) for _ in range(4)]
    keep = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    poisoned = [f.clone() for f in features]
    poisoned[1][0] = float("nan")
    poisoned[2][1] = float("inf")
    with torch.no_grad():
        assert torch.equal(fusion(features, keep), fusion(poisoned, keep))


@pytest.mark.parametrize("name", FUSIONS)
def test_every_fusion_runs_on_every_subset_and_a_missing_sequence_cannot_change_the_output(name):
    net = tiny(name)
    x = image(len(SUBSETS), seed=2)
    mask = torch.tensor(SUBSETS, dtype=torch.bool)
    altered = x.clone()
    altered[~mask] = torch.randn_like(altered[~mask]) * 100  # what a switched-off sequence holds
    with torch.no_grad():
        logits = net(x, mask)
        assert logits.shape == (len(SUBSETS), 3, 16, 16, 16) and torch.isfinite(logits).all()
        assert torch.equal(logits, net(altered, mask))
        # a present sequence does change its sample
        assert not torch.equal(net(x + mask[:, :, None, None, None] * 0.5, mask)[0], logits[0])


@pytest.mark.parametrize("name", FUSIONS)
def test_a_sample_does_not_depend_on_the_others_in_its_batch(name):
    net = tiny(name)
    x = image(3)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        together = net(x, mask)
        alone = torch.cat([net(x[i : i + 1], mask[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_an_unknown_fusion_is_refused_with_the_choices():
    with pytest.raises(ConfigurationError, match="unknown fusion 'concat'; choose one of mean, hemis, attention"):
        MultiBranchUNet(**TINY, fusion="concat")


def test_the_mean_fusion_has_no_parameters_so_older_checkpoints_still_load():
    assert not any(key.startswith("fusions") for key in tiny("mean").state_dict())
    assert any(key.startswith("fusions") for key in tiny("hemis").state_dict())


class SideBySide(torch.nn.Module):
    """The networks' logits side by side: one export (a third cheaper than one per network)
    in which every network keeps its own output channels, so parity holds for each."""

    def __init__(self, nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, image, modality_mask):
        return torch.cat([net(image, modality_mask) for net in self.nets], dim=1)


def exported_fusions_disagreement(dynamic: bool) -> float:
    """Every fusion's tiny network exported side by side: the largest difference of the
    probabilities of ONNX Runtime and torch, all sequences on and one switched off (one batch
    of two samples when ``dynamic``, else two of one)."""
    import onnxruntime as ort

    from brats_cggm.export import _to_onnx

    graph = SideBySide([tiny(name) for name in FUSIONS]).eval()
    model = _to_onnx(graph, (16, 16, 16), graph.nets[0].divisor, dynamic=dynamic)
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3 * len(FUSIONS)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images, masks = image(2, (16, 16, 16), seed=4), torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 1]])
    batches = [(images, masks)] if dynamic else [(images[i:i + 1], masks[i:i + 1]) for i in range(2)]
    worst = 0.0
    for batch, mask in batches:
        with torch.no_grad():
            expected = torch.sigmoid(graph(batch, mask))
        (logits,) = session.run(None, {"image": batch.numpy(), "modality_mask": mask.numpy()})
        worst = max(worst, float((torch.sigmoid(torch.from_numpy(logits)) - expected).abs().max()))
    return worst


def test_every_fusion_exports_to_onnx_and_agrees_with_torch():
    """At a fixed input shape: every fusion's operators (the dynamic shapes of mean fusion are
    exported by conftest's tiny export and the GPU check's dry run; ~5x cheaper)."""
    assert exported_fusions_disagreement(dynamic=False) <= 1e-4


@pytest.mark.slow
def test_every_fusion_exports_with_dynamic_shapes_and_agrees_with_torch_on_masked_batches():
    """As shipped: any batch and spatial size (~35 s on one core)."""
    assert exported_fusions_disagreement(dynamic=True) <= 1e-4
