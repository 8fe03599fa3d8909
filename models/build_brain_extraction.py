"""Convert deepbet's two brain-extraction networks (TorchScript, MIT licence, shipped in the
`deepbet` wheel) to the ONNX files `brats_cggm/raw/weights/deepbet_{bbox,brain}.onnx`, so the
raw-scan path extracts the brain with ONNX Runtime alone: no torch, no download.

    pip install --no-deps deepbet==1.0.2     # only its two .pt files are needed
    python models/build_brain_extraction.py

The weights are stored as float16 (half the size) behind a Cast to float32 that ONNX Runtime
folds when it loads the graph, so the networks run in float32 as in deepbet. The script checks
each file against its TorchScript network on a random volume and prints the largest difference.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

OUT = Path(__file__).resolve().parents[1] / "brats_cggm" / "raw" / "weights"
NETWORKS = {"bbox": "bbox_model.pt", "brain": "model.pt"}


def deepbet_models() -> Path:
    spec = importlib.util.find_spec("deepbet")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("deepbet is not installed: pip install --no-deps deepbet==1.0.2")
    return Path(spec.submodule_search_locations[0]).parent / "data" / "models"


def half_weights(model: onnx.ModelProto, min_size: int = 1024) -> onnx.ModelProto:
    """Every float32 initializer with at least ``min_size`` values -> float16 + a Cast node."""
    graph = model.graph
    kept, casts = [], []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype != np.float32 or array.size < min_size:
            kept.append(tensor)
            continue
        kept.append(numpy_helper.from_array(array.astype(np.float16), f"{tensor.name}__f16"))
        casts.append(helper.make_node("Cast", [f"{tensor.name}__f16"], [tensor.name], to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model


def export(name: str, source: Path, size: int) -> float:
    network = torch.jit.load(str(source)).eval()
    path = OUT / f"deepbet_{name}.onnx"
    example = torch.zeros(1, 1, 32, 32, 32)
    axes = {2: "x", 3: "y", 4: "z"}
    torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["probabilities"],
                      dynamic_axes={"image": axes, "probabilities": axes})
    model = half_weights(onnx.load(str(path)))
    model.doc_string = (f"deepbet {name} network (Fisch et al., Comput Biol Med 2024; MIT licence, "
                        "Copyright (c) 2023 Medical Machine Learning Lab - University of Muenster), "
                        "converted from deepbet 1.0.2 by models/build_brain_extraction.py")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    x = torch.from_numpy(np.random.default_rng(0).normal(0.449, 0.226, (1, 1, size, size, size)).astype(np.float32))
    with torch.no_grad():
        expected = network(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    source = deepbet_models()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, file in NETWORKS.items():
        error = export(name, source / file, 128)
        print(f"deepbet_{name}.onnx: {(OUT / f'deepbet_{name}.onnx').stat().st_size / 1e6:.1f} MB, "
              f"max |p_onnx - p_torch| = {error:.2e} on a random 128^3 volume")


if __name__ == "__main__":
    main()
