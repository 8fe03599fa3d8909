"""Tiny randomly initialised BERT and ViT folders, saved like real local models (tests, demos)."""

from __future__ import annotations

from pathlib import Path

import torch

from multimodal_general.datasets.food101.features import quiet_transformers
from multimodal_general.datasets.food101.synthetic import VOCABULARY


def write_random_encoders(folder: str | Path, hidden: int = 32, image_size: int = 32,
                          seed: int = 0) -> tuple[Path, Path]:
    """A tiny, randomly initialised BERT (WordPiece vocabulary = the synthetic words) and ViT,
    saved with ``save_pretrained`` into ``folder/bert`` and ``folder/vit`` like real local
    model folders. For tests and the synthetic demo only: random weights, not pretrained."""
    import inspect

    transformers = quiet_transformers()

    folder = Path(folder)
    bert, vit = folder / "bert", folder / "vit"
    bert.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCABULARY]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    parameters = inspect.signature(transformers.BertTokenizer.__init__).parameters
    argument = "vocab_file" if "vocab_file" in parameters else "vocab"  # 4.x / 5.x
    transformers.BertTokenizer(**{argument: str(bert / "vocab.txt")}).save_pretrained(bert)
    torch.manual_seed(seed)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64,
    )).save_pretrained(bert)
    transformers.ViTModel(transformers.ViTConfig(
        image_size=image_size, patch_size=8, hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden,
    )).save_pretrained(vit)
    transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(vit)
    return bert, vit
