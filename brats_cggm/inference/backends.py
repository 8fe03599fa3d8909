"""What runs the network inside the segmenter: ONNX Runtime or torch.

A backend is a callable ``(image [N, 4, D, H, W], modality_mask [N, 4]) -> logits [N, 3,
D, H, W]`` on float32 numpy arrays (the logits on the CPU). :class:`OnnxBackend` needs no
torch; :class:`TorchBackend` (a run folder's network) imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from brats_cggm.errors import ConfigurationError

if TYPE_CHECKING:
    from torch import nn


class Backend(Protocol):
    name: str

    def __call__(self, image: np.ndarray, modality_mask: np.ndarray) -> np.ndarray: ...


def default_threads() -> int:
    """ONNX Runtime's intra-op threads when none are asked for: the cores this process
    may run on (``os.sched_getaffinity``), which ONNX Runtime's own default ignores."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

#: CUDA provider options: search for the fastest cuDNN algorithm of each 3-D convolution
#: once (the default heuristic picks poorly for volumetric kernels) and let it use the
#: workspace that algorithm needs
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1"}


class OnnxBackend:
    """An ONNX Runtime session on the CPU or CUDA provider."""

    name = "onnxruntime"

    def __init__(self, model: bytes, provider: str = "cpu", threads: int | None = None) -> None:
        """``threads``: intra-op threads (default: :func:`default_threads`). The threads
        sleep when idle instead of spinning (``allow_spinning = 0``): a segmenter shares
        the cores with the rest of a pipeline, and spinning threads slow both."""
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
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.provider = provider
        self.session = ort.InferenceSession(model, options, providers=providers)

    def __call__(self, image: np.ndarray, modality_mask: np.ndarray) -> np.ndarray:
        feed = {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "modality_mask": np.ascontiguousarray(modality_mask, dtype=np.float32),
        }
        return self.session.run(["logits"], feed)[0]


class TorchBackend:
    """The torch network of a run folder, in eval mode, on ``device``."""

    name = "torch"

    def __init__(self, net: nn.Module, device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    def __call__(self, image: np.ndarray, modality_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self.net(torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=self.device),
                              torch.as_tensor(np.ascontiguousarray(modality_mask, dtype=np.float32), device=self.device))
        return logits.float().cpu().numpy()


def check_device(device: str) -> str:
    """``device`` if torch can use it here; otherwise a one-line error."""
    import torch

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
