"""Shared fixtures: a tiny case, and a writer that lays it out on disk like the real datasets.

The writer encodes each layout's file names and label numbering by hand (from the dataset
documentation), independently of :mod:`fedseg.data.readers`, so reader tests compare against
the conventions themselves rather than against the library's own writer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from fedseg.data.case import Case

TINY_SHAPE = (12, 12, 12)

#: Modules that start a SuperLink, SuperNodes or network namespaces, or listen on fixed ports.
#: ``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadscope``): these
#: modules are one unit of work, run first and one after another on one worker (they are most of
#: the suite's wall time and mostly wait on heartbeats and rounds), while the other worker takes
#: the other modules one at a time (each module's fixtures are then built once).
NETWORK_MODULES = frozenset(
    {
        "test_deploy_busy.py",
        "test_deploy_drills.py",
        "test_deploy_policy.py",
        "test_deploy_trust.py",
        "test_deploy_warm.py",
        "test_deploy_sites.py",
        "test_drillkit.py",
        "test_federation_deployment.py",
    }
)
#: the scope of :data:`NETWORK_MODULES` under ``--dist loadscope``
NETWORK_SCOPE = "network"


def xdist_scope(nodeid: str) -> str:
    """The unit of work of a test under ``--dist loadscope``: its module, or
    :data:`NETWORK_SCOPE` for one of :data:`NETWORK_MODULES`."""
    module = nodeid.split("::", 1)[0]
    return NETWORK_SCOPE if Path(module).name in NETWORK_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` with :func:`xdist_scope` as its scopes, in collection order (the
    network modules first, see :func:`pytest_collection_modifyitems`); other modes as usual."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class NetworkFirst(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False  # keep the network unit first
    return NetworkFirst(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the network modules first (a stable sort: every other test keeps its place)."""
    items.sort(key=lambda item: item.path.name not in NETWORK_MODULES)


# internal modality order is t1, t1ce, t2, flair
_BRATS_NAMES = {
    "brats2021": ("_", ("t1", "t1ce", "t2", "flair"), {0: 0, 1: 1, 2: 2, 4: 4}),
    "brats2023": ("-", ("t1n", "t1c", "t2w", "t2f"), {0: 0, 1: 1, 2: 2, 4: 3}),
}
# MSD: channels FLAIR, T1w, t1gd, T2w; labels 1 oedema, 2 non-enhancing, 3 enhancing
_MSD_CHANNELS = (3, 0, 1, 2)
_MSD_LABELS = {0: 0, 1: 2, 2: 1, 4: 3}


def make_tiny_case(case_id: str = "case_000", seed: int = 0) -> Case:
    """A 12^3 case whose four channels are told apart by their level, labels 0/1/2/4."""
    rng = np.random.default_rng(seed)
    image = np.stack([100.0 * (i + 1) + rng.random(TINY_SHAPE) for i in range(4)]).astype(
        np.float32
    )
    label = np.zeros(TINY_SHAPE, dtype=np.uint8)
    label[3:9, 3:9, 3:9] = 2
    label[4:8, 4:8, 4:8] = 1
    label[5:7, 5:7, 5:7] = 4
    affine = np.array([[-1.0, 0, 0, 6.0], [0, -1.0, 0, 7.0], [0, 0, 1.0, -5.0], [0, 0, 0, 1]])
    return Case(case_id=case_id, image=image, label=label, affine=affine)


def write_nii(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` as NIfTI at ``path`` (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _relabel(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(label)
    for src, dst in mapping.items():
        out[label == src] = dst
    return out


def write_case_as(case: Case, root: Path, layout: str) -> Path:
    """Write ``case`` under ``root`` in ``layout``; return its folder (BraTS) or image (MSD)."""
    if layout == "msd":
        sub = "imagesTr" if case.label is not None else "imagesTs"
        image_path = write_nii(
            root / sub / f"{case.case_id}.nii.gz",
            np.stack([case.image[c] for c in _MSD_CHANNELS], axis=-1),
            case.affine,
        )
        meta_path = root / "dataset.json"
        meta = (
            json.loads(meta_path.read_text())
            if meta_path.exists()
            else {
                "name": "BRATS",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {
                    "0": "background",
                    "1": "edema",
                    "2": "non-enhancing tumor",
                    "3": "enhancing tumour",
                },
                "training": [],
                "test": [],
            }
        )
        if case.label is not None:
            write_nii(
                root / "labelsTr" / image_path.name, _relabel(case.label, _MSD_LABELS), case.affine
            )
            meta["training"].append(
                {"image": f"./imagesTr/{image_path.name}", "label": f"./labelsTr/{image_path.name}"}
            )
        else:
            meta["test"].append(f"./imagesTs/{image_path.name}")
        meta_path.write_text(json.dumps(meta))
        return image_path
    sep, names, labels = _BRATS_NAMES[layout]
    folder = root / case.case_id
    for channel, name in enumerate(names):
        write_nii(folder / f"{case.case_id}{sep}{name}.nii.gz", case.image[channel], case.affine)
    if case.label is not None:
        write_nii(
            folder / f"{case.case_id}{sep}seg.nii.gz", _relabel(case.label, labels), case.affine
        )
    return folder


@pytest.fixture
def tiny_case() -> Case:
    """A fresh tiny case (see :func:`make_tiny_case`)."""
    return make_tiny_case()


@pytest.fixture
def write_case() -> Callable[[Case, Path, str], Path]:
    """The :func:`write_case_as` writer."""
    return write_case_as


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """One torch thread while a module's tests run, as a Ray actor with 1 CPU gets (and far
    faster on a busy 2-core machine); use with ``pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """Nine tiny cases (:func:`helpers.write_cohort`) in three sites of three."""
    from helpers import three_sites, write_cohort

    root = tmp_path_factory.mktemp("fed-cohort") / "data"
    return root, three_sites(write_cohort(root))
