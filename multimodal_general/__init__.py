"""Modality-agnostic balanced multimodal learning: CGGM and baseline balancers.

Nothing in this package knows about medical images; the BraTS application in
``brats_cggm`` builds on it.
"""

__version__ = "0.1.0"
