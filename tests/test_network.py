"""The segmentation networks: shapes, masks, sequence dropout, CGGM heads, presets."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from brats_cggm import MODALITIES
from brats_cggm.errors import ConfigurationError
from brats_cggm.network import (
    EarlyFusionUNet,
    MaskedMeanFusion,
    MultiBranchUNet,
    balancer_modalities,
    build_network,
    make_auxiliary_heads,
)
from brats_cggm.network.masking import sequence_dropout
from multimodal_general.balance import CGGM
from multimodal_general.balance.base import detached

TINY = {"channels": (4, 8, 16), "strides": (2, 2, 2), "num_res_units": 1, "head_channels": 4}


def tiny(**overrides) -> MultiBranchUNet:
    torch.manual_seed(0)
    return MultiBranchUNet(**{**TINY, **overrides})


def image(n=2, shape=(16, 16, 16), seed=1) -> torch.Tensor:
    return torch.randn(n, len(MODALITIES), *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 40, 8), (32, 16, 24)])
def test_logits_have_the_input_grid_for_multiples_of_the_divisor(shape):
    net = tiny().eval()
    assert net.divisor == 8
    with torch.no_grad():
        assert net(image(1, shape)).shape == (1, 3, *shape)


def test_the_small_preset_takes_a_non_cubic_brats_patch():
    net = build_network("small").eval()
    assert net.divisor == 16  # 96 x 128 x 80 = (6, 8, 5) x 16
    with torch.no_grad():
        assert net(image(1, (96, 128, 80))).shape == (1, 3, 96, 128, 80)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 4, 16, 16, 12), r"spatial size \(16, 16, 12\) is not divisible by \(8, 8, 8\)"),
        (torch.zeros(1, 3, 16, 16, 16), r"image \[N, 4, D, H, W\] with channels flair, t1, t1ce, t2"),
        (torch.zeros(4, 16, 16, 16), r"got shape \(4, 16, 16, 16\)"),
    ],
)
def test_a_bad_image_shape_is_a_configuration_error(bad, match):
    with pytest.raises(ConfigurationError, match=match):
        tiny()(bad)


@pytest.mark.parametrize("mask", [torch.ones(2, 3), torch.ones(1, 4), torch.ones(2, 4, 1)])
def test_a_bad_mask_shape_is_a_configuration_error(mask):
    with pytest.raises(ConfigurationError, match=r"modality_mask must have shape \[N, M\] = \[2, 4\]"):
        tiny()(image(2), mask)


def test_bad_constructor_arguments_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="one entry per level"):
        MultiBranchUNet(channels=(4, 8), strides=(2, 2, 2))
    with pytest.raises(ConfigurationError, match="sequence_dropout"):
        MultiBranchUNet(**TINY, sequence_dropout=1.0)
    with pytest.raises(ConfigurationError, match="unknown network preset 'large'"):
        build_network("large")
    with pytest.raises(ConfigurationError, match="preset 'small'.*widths"):
        build_network("small", widths=(1, 2))
    with pytest.raises(ConfigurationError, match="no branch named 't1gd'"):
        tiny().encoder("t1gd")


# ------------------------------------------------------------------------ masks
def test_a_masked_branch_input_cannot_change_the_output():
    net = tiny().eval()
    x = image(2)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    changed = x.clone()
    changed[0, 1] = torch.randn(16, 16, 16) * 100
    changed[0, 1, 0, 0, 0] = float("nan")
    with torch.no_grad():
        reference, altered = net(x, mask), net(changed, mask)
        assert torch.equal(reference, altered)
        # the same change where the branch is on does change that sample
        changed[1, 1] += 1.0
        assert not torch.equal(net(changed, mask)[1], reference[1])


def test_a_masked_branch_is_removed_from_the_fusion_not_averaged_as_zeros():
    fusion = MaskedMeanFusion()
    features = [torch.full((2, 1, 2, 2, 2), v) for v in (1.0, 2.0, 6.0, float("nan"))]
    keep = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    fused = fusion(features, keep)
    assert torch.equal(fused[0], torch.full((1, 2, 2, 2), 3.0))  # (1 + 2 + 6) / 3
    assert torch.equal(fused[1], torch.zeros(1, 2, 2, 2))  # nothing on: zeros, not NaN


def test_an_all_ones_mask_equals_no_mask_and_float_masks_work():
    net = tiny().eval()
    x = image(2)
    with torch.no_grad():
        assert torch.equal(net(x, torch.ones(2, 4, dtype=torch.bool)), net(x))
        half = torch.tensor([[1.0, 0.0, 1.0, 1.0]] * 2)
        assert torch.equal(net(x, half), net(x, half.bool()))


def test_masked_branch_gets_no_gradient_from_its_masked_samples():
    net = tiny()
    mask = torch.tensor([[1, 0, 1, 1]] * 2, dtype=torch.bool)
    net(image(2), mask).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in net.encoder("t1").parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.encoder("flair").parameters())


# -------------------------------------------------------------- sequence dropout
def test_sequence_dropout_never_switches_off_every_available_branch():
    torch.manual_seed(0)
    available = torch.rand(2000, 4) > 0.3
    available[:5] = False  # samples without any sequence stay without
    keep = sequence_dropout(available, p=0.95)
    assert not (keep & ~available).any()
    assert keep[available.any(dim=1)].any(dim=1).all()
    assert not keep[:5].any()
    assert 0 < keep.sum() < available.sum()


def test_sequence_dropout_acts_in_training_only_and_keeps_branch_features_real():
    net = tiny(sequence_dropout=0.5)
    reference = tiny()  # same seed: same weights, no dropout
    x = image(4)
    net.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))
        net.train(), reference.train()
        torch.manual_seed(3)
        outputs = [net.forward_with_features(x) for _ in range(4)]
        _, reference_features = reference.forward_with_features(x)
    assert any(not torch.equal(a[0], b[0]) for a, b in itertools.pairwise(outputs))
    for _, features in outputs:  # dropout removes a branch from the fusion only
        assert all(torch.equal(level, ref) for m in MODALITIES
                   for level, ref in zip(features[m], reference_features[m]))


# ---------------------------------------------------------------- CGGM heads
def test_heads_predict_the_fused_shape_and_stay_out_of_the_network():
    net = tiny()
    keys_before = set(net.state_dict())
    heads = make_auxiliary_heads(net)
    assert set(heads) == set(MODALITIES)
    assert set(net.state_dict()) == keys_before
    net_params = {id(p) for p in net.parameters()}
    logits, features = net.forward_with_features(image(2))
    assert [tuple(f.shape) for f in features["t2"]] == [(2, 4, 8, 8, 8), (2, 8, 4, 4, 4), (2, 16, 2, 2, 2)]
    for name, (head, last) in heads.items():
        assert last.weight.shape == net.output_conv.weight.shape == (3, 4, 1, 1, 1)
        assert not net_params & {id(p) for p in head.parameters()}
        assert head(detached(features[name])).shape == logits.shape


def test_a_head_reads_every_level_of_its_branch_through_skip_connections():
    net = tiny()
    head, _ = make_auxiliary_heads(net)["t1ce"]
    _, features = net.forward_with_features(image(1))
    pyramid = [f.detach().requires_grad_() for f in features["t1ce"]]
    head(pyramid).sum().backward()
    assert all(level.grad is not None and level.grad.abs().sum() > 0 for level in pyramid)


def test_cggm_registers_the_branches_and_scales_each_encoder_gradient():
    net = tiny()
    heads = make_auxiliary_heads(net)
    criterion = nn.BCEWithLogitsLoss()
    balancer = CGGM(balancer_modalities(net, heads), fused_last_layer=net.output_conv,
                    criterion=criterion, metric="soft_dice", preset="paper")
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.1)
    x = image(2)
    target = (x[:, :3] > 0.5).float()
    for _ in range(2):
        optimizer.zero_grad()
        logits, features = net.forward_with_features(x)
        task_loss = criterion(logits, target)
        (task_loss + balancer.extra_loss(features, logits, target, task_loss)).backward()
        before = {m: [p.grad.clone() for p in net.encoder(m).parameters()] for m in MODALITIES}
        decoder_before = [p.grad.clone() for p in net.decoder.parameters()]
        telemetry = balancer.modulate()
        b = telemetry.per_modality["B"]
        for index, m in enumerate(MODALITIES):
            for grad, p in zip(before[m], net.encoder(m).parameters()):
                torch.testing.assert_close(p.grad, grad * b[index])
        assert all(torch.equal(g, p.grad) for g, p in zip(decoder_before, net.decoder.parameters()))
        assert all(p.grad is not None for head, _ in heads.values() for p in head.parameters())
        optimizer.step()
    assert not torch.allclose(b, torch.ones(4))  # paper preset: real coefficients


def test_head_losses_send_no_gradient_into_the_encoders():
    net = tiny()
    heads = make_auxiliary_heads(net)
    _, features = net.forward_with_features(image(2))
    sum(head(detached(features[m])).sum() for m, (head, _) in heads.items()).backward()
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------- early fusion
def test_early_fusion_has_the_same_signature_and_zeroes_masked_channels():
    torch.manual_seed(0)
    net = build_network("early_fusion", channels=(4, 8, 16), strides=(2, 2)).eval()
    assert isinstance(net, EarlyFusionUNet) and net.divisor == 4
    x = image(2, (12, 16, 8))
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])
    zeroed = x.clone()
    zeroed[0, 2] = 0
    with torch.no_grad():
        logits, features = net.forward_with_features(x, mask)
        assert logits.shape == (2, 3, 12, 16, 8) and features == {}
        assert torch.equal(logits, net(zeroed, mask))
        assert torch.equal(net(x, torch.ones(2, 4)), net(x))
    with pytest.raises(ConfigurationError, match="not divisible by"):
        net(image(1, (10, 16, 8)))


# ---------------------------------------------------------------- parameters
def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_of_the_presets():
    counts = {name: count(build_network(name)) for name in ("small", "default", "early_fusion")}
    assert counts == EXPECTED_PARAMETERS
    net = build_network("small")
    branch = count(net.encoder("flair"))
    assert all(count(net.encoder(m)) == branch for m in MODALITIES)
    assert count(net) == 4 * branch + count(net.decoder) + count(net.output_conv)


EXPECTED_PARAMETERS = {"small": 679_883, "default": 5_038_867, "early_fusion": 1_190_345}


def test_the_speed_benchmark_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "speed.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "network_speed.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--sizes", "32", "--repeats", "1", "--out", str(out),
         "--networks", "early-fusion-small,multi-branch-small"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "multi-branch-small" in result.stdout
    baseline, multi_branch = json.loads(out.read_text())["rows"]
    assert baseline["ratio"] == 1.0 and multi_branch["ratio"] > 0
    assert multi_branch["gflop"] > baseline["gflop"] > 0
    assert multi_branch["stages_gflop"]["branches"] > 0 and multi_branch["stages_gflop"]["decoder"] > 0
