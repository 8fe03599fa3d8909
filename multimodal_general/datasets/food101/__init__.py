"""UPMC-Food 101: recipe text and food photos, 101 classes.

``records`` reads the official JSON layout, ``features`` caches a pretrained BERT's and ViT's
token features and loads them as a task, ``synthetic`` writes a small dataset in the same
layout, ``encoders`` writes tiny random model folders for tests and demos.
"""

from multimodal_general.datasets.food101.encoders import write_random_encoders
from multimodal_general.datasets.food101.features import (
           FeatureSettings,
           extract_features,
           load_food101,
)
from multimodal_general.datasets.food101.records import MODALITIES, Food101Records, read_food101
from multimodal_general.datasets.food101.synthetic import write_synthetic_food101

__all__ = ["MODALITIES", "FeatureSettings", "Food101Records", "extract_features", "load_food101", "read_food101",
           "write_random_encoders", "write_synthetic_food101"]
