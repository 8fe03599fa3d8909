"""``brats-cggm``: the command line of the BraTS application."""

from __future__ import annotations

import platform

from rich.console import Console
from rich.table import Table

from multimodal_general.cli_support import make_app, run_app

app = make_app("Brain-tumour segmentation on BraTS MRI with CGGM-balanced training.")
console = Console()


@app.command()
def info() -> None:
    """Show the installed stack and the compute devices it can use."""
    import monai
    import onnxruntime
    import torch

    table = Table(title="brats-cggm environment", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("monai", monai.__version__)
    table.add_row("onnxruntime", f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    table.add_row("CUDA devices", ", ".join(gpus) if gpus else "none (CPU only)")
    table.add_row("CPU threads", str(torch.get_num_threads()))
    console.print(table)


def main() -> None:
    run_app(app)
