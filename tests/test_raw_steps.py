"""The raw path's small parts: which sequence deepbet runs on, the convergence check, the
displacement measure, deepbet's nearest-exact resizing, and deepbet's networks as shipped."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from brats_cggm.raw import brain, register
from brats_cggm.raw.register import Registration, RegistrationFailed, mean_displacement


def test_deepbet_runs_on_the_t1_then_the_t1ce_and_says_so():
    assert brain.choose_sequence(("flair", "t1", "t1ce"))[0] == "t1"
    sequence, note = brain.choose_sequence(("flair", "t1ce", "t2"))
    assert sequence == "t1ce" and "no T1 in this case" in note
    assert brain.choose_sequence(("flair", "t2")) == (None, "no T1-weighted sequence (T1 or T1ce): deepbet cannot extract the brain")


def test_a_registration_outside_the_measured_range_stops_the_case():
    ok = Registration(sitk.Euler3DTransform(), -0.3, -0.6, 10, "converged")
    register.check_converged("c", "FLAIR to the T1CE", "sequence", ok)
    failed = Registration(sitk.Euler3DTransform(), -0.1, -0.12, 200, "maximum iterations")
    with pytest.raises(RegistrationFailed, match=r"c: FLAIR to the T1CE: the registration did not converge \(Mattes MI -0.120"):
        register.check_converged("c", "FLAIR to the T1CE", "sequence", failed)


def test_a_brain_mask_far_from_an_adult_brain_is_refused(tmp_path):
    from brats_cggm.errors import InconsistentCase
    from brats_cggm.raw.ingest import Ingest

    small = sitk.Image([12, 12, 12], sitk.sitkFloat32)
    small[2:10, 2:10, 2:10] = 1.0  # "skull-stripped", 0.5 ml of brain
    with pytest.raises(InconsistentCase, match=r"c: brain mask of 1 ml, outside the plausible adult range 700-2300 ml"):
        Ingest("c", tmp_path)._brain({"t1ce": small}, "t1ce", {}, extract_from=None)


def test_mean_displacement_of_known_transforms():
    mask = sitk.Image([10, 10, 10], sitk.sitkUInt8) + 1
    shift = sitk.TranslationTransform(3, (3.0, 4.0, 0.0))
    assert mean_displacement(sitk.Euler3DTransform(), sitk.Euler3DTransform(), mask) == 0
    assert mean_displacement(shift, sitk.Euler3DTransform(), mask) == pytest.approx(5.0)
    turned = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, np.pi / 2)  # about the origin, in-plane
    point = np.array(turned.TransformPoint((1.0, 0.0, 0.0)))
    assert np.allclose(point, (0, 1, 0)) and register.transform_matrix(turned)[:3, :3] @ (1, 0, 0) == pytest.approx((0, 1, 0))


@pytest.mark.parametrize("shape, target", [((7, 9, 5), (4, 4, 4)), ((30, 17, 11), (64, 40, 23))])
def test_resize_matches_torch_nearest_exact(shape, target):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(array)[None, None], target, mode="nearest-exact")[0, 0]
    assert (brain._resize_nearest(array, target) == expected.numpy()).all()


def test_the_shipped_networks_run_on_onnx_runtime():
    box_net, mask_net = brain._sessions()
    x = np.random.default_rng(0).normal(0.449, 0.226, (1, 1, 32, 32, 32)).astype(np.float32)
    for session in (box_net, mask_net):
        p = session.run(None, {"image": x})[0]
        assert p.shape == (1, 2, 32, 32, 32) and np.allclose(p.sum(axis=1), 1, atol=1e-4)  # softmax over 2 classes
