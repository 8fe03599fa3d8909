"""Inference: the segmenter (ONNX Runtime or torch), model cards, contribution maps and
the files a prediction writes."""
