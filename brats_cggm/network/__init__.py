"""Segmentation networks: the multi-branch 3-D U-Net, its CGGM heads, an early-fusion baseline.

>>> net = build_network("small", sequence_dropout=0.25)
>>> logits, features = net.forward_with_features(image, modality_mask)   # [N, 3, D, H, W]
>>> heads = make_auxiliary_heads(net)
>>> balancer = CGGM(balancer_modalities(net, heads), fused_last_layer=net.output_conv,
...                 criterion=loss, metric="soft_dice")
"""

from brats_cggm.network.auxiliary_head import (
    AuxiliaryHead,
    balancer_modalities,
    make_auxiliary_heads,
)
from brats_cggm.network.branch_encoder import BranchEncoder
from brats_cggm.network.decoder import FusedDecoder
from brats_cggm.network.early_fusion import EarlyFusionUNet
from brats_cggm.network.fusion import MaskedMeanFusion
from brats_cggm.network.multi_branch_unet import MultiBranchUNet
from brats_cggm.network.presets import NETWORK_PRESETS, NetworkPreset, build_network

__all__ = [
    "NETWORK_PRESETS",
    "AuxiliaryHead",
    "BranchEncoder",
    "EarlyFusionUNet",
    "FusedDecoder",
    "MaskedMeanFusion",
    "MultiBranchUNet",
    "NetworkPreset",
    "balancer_modalities",
    "build_network",
    "make_auxiliary_heads",
]
