"""The metrics each task's papers report, computed the way the field computes them.

* Food-101 (UPMC): accuracy and macro F1.
* CMU-MOSI (as in MulT's ``eval_mosi``): MAE and Pearson correlation on the raw predictions;
  Acc-7 after clipping predictions and labels to [-3, 3] and rounding; Acc-2 and F1
  (weighted) twice: "non-zero" (samples labelled exactly 0 left out, positive vs negative)
  and "with zero" (non-negative vs negative over all samples).
* IEMOCAP (as in MMIN): accuracy (the "weighted accuracy", WA), unweighted accuracy (UA, the
  mean of the per-class recalls), and F1 weighted and unweighted (macro).

Every function takes numpy arrays or tensors and returns plain floats. ``SELECTION`` names
the validation metric each task selects its model by, and whether larger is better.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def classification_metrics(logits, target) -> dict[str, float]:
    """Accuracy (WA), unweighted accuracy (UA), F1 weighted and macro, from logits ``[N, C]``
    and class indices ``[N]``."""
    predicted, target = _numpy(logits).argmax(axis=1), _numpy(target).reshape(-1)
    labels = np.arange(_numpy(logits).shape[1])
    present = np.unique(target)  # UA and macro F1 over the classes this split has
    return {
        "acc": float(accuracy_score(target, predicted)),
        "ua": float(recall_score(target, predicted, labels=present, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(target, predicted, labels=labels, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(target, predicted, labels=present, average="macro", zero_division=0)),
    }


def sentiment_metrics(prediction, target) -> dict[str, float]:
    """CMU-MOSI's regression metrics from predictions and labels ``[N]`` or ``[N, 1]``."""
    prediction, target = _numpy(prediction).reshape(-1).astype(float), _numpy(target).reshape(-1).astype(float)
    if prediction.shape != target.shape:
        raise ValueError(f"{prediction.shape[0]} predictions for {target.shape[0]} labels")
    result = {"mae": float(np.abs(prediction - target).mean())}
    spread = prediction.std() * target.std()
    result["corr"] = float(np.corrcoef(prediction, target)[0, 1]) if spread > 0 else math.nan
    result["acc7"] = float(np.mean(np.round(np.clip(prediction, -3, 3)) == np.round(np.clip(target, -3, 3))))
    nonzero = target != 0
    if nonzero.any():
        p, t = prediction[nonzero] > 0, target[nonzero] > 0
        result["acc2_nonzero"] = float(accuracy_score(t, p))
        result["f1_nonzero"] = float(f1_score(t, p, average="weighted", zero_division=0))
    else:
        result["acc2_nonzero"] = result["f1_nonzero"] = math.nan
    p, t = prediction >= 0, target >= 0
    result["acc2_with_zero"] = float(accuracy_score(t, p))
    result["f1_with_zero"] = float(f1_score(t, p, average="weighted", zero_division=0))
    return result


TASK_METRICS = {
    "food101": ("acc", "f1_macro"),
    "mosi": ("acc2_nonzero", "acc2_with_zero", "f1_nonzero", "f1_with_zero", "acc7", "mae", "corr"),
    "iemocap": ("acc", "ua", "f1_weighted", "f1_macro"),
}
# (validation metric a run is selected by, larger is better)
SELECTION = {"food101": ("acc", True), "mosi": ("mae", False), "iemocap": ("acc", True)}
LOWER_IS_BETTER = {"mae"}


def task_metrics(kind: str, output, target) -> dict[str, float]:
    """All metrics of a task kind: :func:`classification_metrics` or :func:`sentiment_metrics`."""
    if kind == "classification":
        return classification_metrics(output, target)
    return sentiment_metrics(output, target)
