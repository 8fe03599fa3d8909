"""Brain-tumour segmentation on BraTS MRI with CGGM-balanced multi-branch 3-D networks."""

__version__ = "0.1.0"

#: The project's canonical order of MRI sequences (every reader maps its source to it).
MODALITIES = ("flair", "t1", "t1ce", "t2")
