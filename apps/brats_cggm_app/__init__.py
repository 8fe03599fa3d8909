"""The BraTS web app (the ``brats_cggm_app`` package, in the repository's ``apps/`` folder):
``build_app`` makes the Gradio page, ``launch`` serves it (``brats-cggm app``). See docs/app.md.

The two are imported on first use, so that :mod:`brats_cggm_app.cli` (the ``brats-cggm``
console script) starts without Gradio."""

from __future__ import annotations

__all__ = ["build_app", "launch"]


def __getattr__(name: str):
    if name in __all__:
        from brats_cggm_app import ui

        return getattr(ui, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
