"""The ``brats-cggm`` console script: the commands of :mod:`brats_cggm.cli` plus ``app``.

The web app is the ``brats_cggm_app`` package (in ``apps/``) and imports flow
``brats_cggm_app -> brats_cggm``, so the ``app`` command is added to brats_cggm's command line
here rather than there. Gradio is imported only when the command runs (every other command
starts without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brats_cggm.cli import app, main
from brats_cggm.errors import ConfigurationError


@app.command("app")
def serve(
    model: Annotated[Path | None, typer.Option(help="a shipped model's name or an exported .onnx file (default: the shipped brats_cggm_real)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the app to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 7860,
    concurrency: Annotated[int, typer.Option(help="segmentations run at once; more requests wait in a queue")] = 2,
    max_file_mb: Annotated[int, typer.Option(help="largest upload accepted, in MB")] = 256,
) -> None:
    """Serve the web app: upload MRI volumes, see the segmentation and each sequence's
    contribution, download the result. Never opens a public share link."""
    try:
        from brats_cggm_app import launch
    except ImportError as error:
        raise ConfigurationError(f"the web app needs Gradio ({error.name} is missing): pip install 'brats-cggm[app]'") from None
    if concurrency < 1 or max_file_mb < 1:
        raise ConfigurationError("--concurrency and --max-file-mb must be at least 1")
    try:
        launch(model, host, port, concurrency=concurrency, max_file_mb=max_file_mb)
    except OSError as error:
        raise ConfigurationError(f"cannot serve on {host}:{port} ({error})") from None


__all__ = ["app", "main"]
