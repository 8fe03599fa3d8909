"""The BraTS web app: ``build_app`` makes the Gradio page, ``launch`` serves it
(``brats-cggm app``). See docs/app.md."""

from apps.brats.ui import build_app, launch

__all__ = ["build_app", "launch"]
