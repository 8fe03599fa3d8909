"""Training the segmentation network with a balancer: configuration, loop, checkpoints.

>>> config = resolve_config("cpu-small", overrides={"data.dir": "phantoms", "optim.epochs": 5})
>>> summary = Trainer(config, Path("runs/demo"), start(config.device)).fit()
"""

from brats_cggm.training.config import TRAINING_PRESETS, TrainConfig, resolve_config
from brats_cggm.training.distributed import Place, start, stop
from brats_cggm.training.trainer import Interrupted, Trainer, TrainingDiverged

__all__ = [
    "TRAINING_PRESETS", "Interrupted", "Place", "TrainConfig", "Trainer", "TrainingDiverged",
    "resolve_config", "start", "stop",
]
