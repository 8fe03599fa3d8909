"""What runs the network inside the segmenter: ONNX Runtime or torch.

A backend is a callable ``(image [N, 4, D, H, W], modality_mask [N, 4]) -> logits [N, 3,
D, H, W]`` on float32 torch tensors (logits returned on the CPU), plus the device the
sliding window should put its windows on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from brats_cggm.errors import ConfigurationError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

#: CUDA provider options: search for the fastest cuDNN algorithm of each 3-D convolution
#: once (the default heuristic picks poorly for volumetric kernels) and let it use the
#: workspace that algorithm needs
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1"}


class OnnxBackend:
    """An ONNX Runtime session on the CPU or CUDA provider."""

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, model: bytes, provider: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise ConfigurationError(f"provider must be one of {', '.join(PROVIDERS)}; got '{provider}'")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise ConfigurationError(
                f"ONNX Runtime here has no {PROVIDERS[provider]} (available: {', '.join(available)}); "
                "for --provider cuda install onnxruntime-gpu (pip install 'brats-cggm[gpu]') on a machine with an NVIDIA GPU"
            )
        providers: list = ["CPUExecutionProvider"]
        if provider == "cuda":
            providers.insert(0, (PROVIDERS["cuda"], CUDA_OPTIONS))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.provider = provider
        self.session = ort.InferenceSession(model, options, providers=providers)

    def __call__(self, image: Tensor, modality_mask: Tensor) -> Tensor:
        feed = {
            "image": np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32),
            "modality_mask": modality_mask.detach().cpu().numpy().astype(np.float32),
        }
        return torch.from_numpy(self.session.run(["logits"], feed)[0])


class TorchBackend:
    """The torch network of a run folder, in eval mode, on ``device``."""

    name = "torch"

    def __init__(self, net: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, image: Tensor, modality_mask: Tensor) -> Tensor:
        logits = self.net(image.to(self.device, torch.float32), modality_mask.to(self.device))
        return logits.float().cpu()


def check_device(device: str) -> str:
    """``device`` if torch can use it here; otherwise a one-line error."""
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ConfigurationError(f"device '{device}' is not available here; use cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    return device


def model_kind(path: Path) -> str:
    """``"onnx"`` for an exported file, ``"run"`` for a training run folder."""
    path = Path(path)
    if path.is_dir():
        return "run"
    if path.suffix == ".onnx":
        return "onnx"
    raise ConfigurationError(f"{path}: --model must be an exported .onnx file or a run folder of `brats-cggm train`")
