"""Small models and batches shared by the balancer tests; the tiny trained and exported
BraTS model shared by the inference tests; and what `make test`'s parallel workers need.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``; the
Makefile's PYTEST_XDIST):

* a file runs whole on one worker, so that its module fixtures (trainings, exports, the
  web server, the torch-free venv) are built once. (``--dist loadgroup`` with
  ``xdist_group`` marks would split files finer, but pytest-xdist 3.8 groups by editing
  ``item._nodeid``, which pytest 9.2 no longer reads: the marks are ignored.)
* the files that take longest go first (:data:`LONGEST_FIRST`), the many short ones fill
  in at the end, so that both workers finish at about the same time;
* each worker keeps torch at one intra-op thread (two workers on two cores: a second
  thread per worker only spins against the other worker);
* session fixtures that build something expensive (:func:`tiny_export`) build it once
  per run under a file lock, in a folder the workers share (:func:`built_once`).

Without xdist (``pytest`` alone, or ``make test PYTEST_XDIST=``) none of this changes
what runs: the order of the files is then pytest's own.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from torch import nn
from training_cases import CPU, tiny_config, torch_threads

from multimodal_general.balance import CGGM, Modality
from multimodal_general.training.imbalance import LateFusionNet, unimodal_head

#: set in the processes of pytest-xdist's workers ("gw0", "gw1", ...)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    torch.set_num_threads(1)

#: the files that took longest under ``make test`` (15-65 s each on 2 shared cores), longest
#: first: handed out first to the workers. Only the order depends on this list; a file
#: missing from it just runs later, in pytest's order. The torch-free install waits on
#: the package index more than it computes: started first, it overlaps the other worker.
LONGEST_FIRST = (
    "test_torch_free_install.py", "test_training.py", "test_app.py", "test_gpu_check.py", "test_export.py",
    "test_raw_chain.py", "test_numpy_chain.py", "test_inference_speed_bench.py", "test_network_fit.py",
    "test_real_files_cli.py", "test_general_tasks.py", "test_training_speed_bench.py", "test_app_raw.py",
    "test_brats_compare.py", "test_network.py", "test_raw_real.py", "test_phantom.py", "test_real_cv_bench.py",
    "test_evaluate_subsets.py", "test_fusion.py", "test_shipped_model.py", "test_partial_training.py",
    "test_cli.py", "test_distributed.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the files of :data:`LONGEST_FIRST` first (a stable sort: every worker
    computes the same order, as xdist requires; ``--no-loadscope-reorder`` keeps it)."""
    if XDIST_WORKER:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` filled by ``build(folder)`` once per test run. Under pytest-xdist
    it lies in the run's temporary folder that every worker shares (the parent of the
    worker's own): the first worker builds it under a file lock, the others wait for it
    and reuse it (a build that raised is redone by the next worker that asks)."""
    if not XDIST_WORKER:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{folder}.lock"):
        done = folder / ".built"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def _train_and_export_tiny(folder: Path) -> None:
    from brats_cggm.data.phantom import write_phantoms
    from brats_cggm.export import export_run
    from brats_cggm.training import Trainer

    with torch_threads(1):
        write_phantoms(folder / "train", 6, size=32, layout="brats2021", seed=0)
        config = tiny_config(folder / "train", network__sequence_dropout=0.25, optim__epochs=2)
        Trainer(config, folder / "run", CPU, report=lambda line: None).fit()
        card = export_run(folder / "run", folder / "models" / "tiny.onnx", parity_cases=1)
    # the card export_run returned, as it returned it (test_export compares it with the files)
    (folder / "returned_card.pickle").write_bytes(pickle.dumps(card))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> SimpleNamespace:
    """One tiny BraTS run (training_cases.TINY on 6 phantoms of 32^3, sequence dropout 0.25,
    2 epochs) and its ONNX export with one parity patch, shared by tests/test_export.py and
    tests/test_predict.py (the export is what costs: ~8 s). Read-only: a test writes its
    own files in its own folder."""
    folder = built_once(tmp_path_factory, "tiny_export", _train_and_export_tiny)
    return SimpleNamespace(train=folder / "train", run=folder / "run", onnx=folder / "models" / "tiny.onnx",
                           card=pickle.loads((folder / "returned_card.pickle").read_bytes()))

CLASSES = 3
FEATURES = 32


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is far faster on a shared machine (as the CLI's default);
    the global thread count is restored after the test."""
    with torch_threads(1):
        yield


def make_setup(m: int = 2, *, preset: str = "stable", lam: float = 0.1, rho: float = 1.2, seed: int = 0, **options):
    """A LateFusionNet with ``m`` modalities of 5 inputs each, and a CGGM over it."""
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    model = LateFusionNet({n: 5 for n in names}, CLASSES, hidden=16, feature_dim=FEATURES)
    criterion = nn.CrossEntropyLoss()
    modalities = []
    for n in names:
        head = unimodal_head(FEATURES, CLASSES)
        modalities.append(Modality(n, model.encoders[n], head, head[-1]))
    balancer = CGGM(
        modalities, fused_last_layer=model.last_layer, criterion=criterion,
        preset=preset, lam=lam, rho=rho, **options,
    )
    return model, balancer, criterion


def make_batch(m: int = 2, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    inputs = {f"m{i}": torch.randn(n, 5, generator=g) for i in range(m)}
    return inputs, torch.randint(CLASSES, (n,), generator=g)


@pytest.fixture
def setup2():
    return make_setup(2)
