"""Helpers shared by the tests: a tiny hand-written cohort, a tiny config, an in-process federation.

Tiny: 20^3 BraTS-2021-layout cases prepared to 16^3, a 3-level U-Net with 4 base channels,
sites of 3 cases (2 train, 1 held out), 2-3 rounds. The fixtures built on them (``cohort``,
``one_torch_thread``) are in ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.config import FedsegConfig
from fedseg.data.case import Case
from fedseg.federation import site as site_module
from fedseg.federation.client_app import build_client_app
from fedseg.federation.inprocess import InProcessGrid
from fedseg.federation.loop import LoopResult
from fedseg.federation.server_app import serve

SIZE = 20
NUM_CASES = 9

#: ``fedseg train`` options for a tiny model on these cases: the 16^3 resized grid of ``cpu-demo``
#: (``fedseg train`` defaults to ``cpu-native``), a 3-level U-Net with 4 base channels
TINY_TRAIN = [
    "--image-size",
    "16",
    "--base-channels",
    "4",
    "--set",
    "depth=3",
    "--preset",
    "cpu-demo",
]


def write_cohort(root: Path, num_cases: int = NUM_CASES, seed: int = 0) -> list[str]:
    """Tiny BraTS-2021-layout cases: a bright ellipsoid brain with a layered tumour."""
    from fedseg.data.readers import save_case

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")).astype(np.float32)
    brain = (((grid - SIZE / 2 + 0.5) / (SIZE * 0.42)) ** 2).sum(0) < 1
    ids = []
    for i in range(num_cases):
        centre = rng.integers(7, SIZE - 7, 3)
        radius = rng.uniform(2.5, 3.5)
        d = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        label = np.zeros((SIZE,) * 3, np.uint8)
        label[(d < radius) & brain] = 2
        label[(d < radius * 0.6) & brain] = 1
        label[(d < radius * 0.3) & brain] = 4
        image = rng.normal(1.0, 0.1, (4, SIZE, SIZE, SIZE)).astype(np.float32) * brain
        image[:, label > 0] += 1.0
        image[1, label == 4] += 1.0
        cid = f"CASE_{i:03d}"
        save_case(Case(cid, image, label, np.eye(4)), root, "brats2021")
        ids.append(cid)
    return ids


def three_sites(ids: list[str]) -> dict[str, list[str]]:
    """Nine case ids as three sites of three (``site-0``..``site-2``)."""
    return {f"site-{k}": ids[3 * k : 3 * k + 3] for k in range(3)}


def tiny_cfg(**kw: Any) -> FedsegConfig:
    """The tiny config (16^3 cases, 4 base channels, depth 3, 3 sites, 2 rounds), ``kw`` on top."""
    base: dict[str, Any] = dict(
        image_size=16,
        patch_size=16,
        base_channels=4,
        depth=3,
        batch_size=2,
        augment=False,
        bias_correction="none",  # N4's fixed cost per case, not tested here (test_bias.py is)
        test_fraction=0.34,
        num_server_rounds=2,
        num_sites=3,
        round_timeout=30.0,
    )
    base.update(kw)
    return FedsegConfig(**base)


def make_grid(
    cfg: FedsegConfig,
    root: Path,
    parts: dict[str, list[str]],
    tmp: Path,
    *,
    push_pull: bool = False,
) -> tuple[InProcessGrid, FedsegConfig]:
    from fedseg.data.partition import write_partition

    csv = tmp / "partition.csv"
    write_partition(parts, csv)
    cfg = cfg.replace(data_path=str(root), partition_file=str(csv), num_sites=len(parts))
    app = build_client_app(cfg.to_run_config())
    grid = InProcessGrid(
        app,
        [{"partition-id": i, "num-partitions": len(parts)} for i in range(len(parts))],
        push_pull=push_pull,
    )
    return grid, cfg


def late_replies(
    grid: InProcessGrid,
    node: int,
    held: Callable[[Any], bool],
    carrier: int,
    arrives: Callable[[Any], bool],
) -> None:
    """``node``'s replies to the messages ``held`` picks are on their way past their timeout:
    they reach the grid only when ``carrier`` runs a message that ``arrives`` picks (the
    in-process grid runs each message at once, so another node's message marks the time)."""
    late: dict[str, Any] = {}

    def hold(msg: Any, reply: Any) -> Any:
        if held(msg) and reply is not None:
            late[msg.metadata.message_id] = reply
            return None
        return reply

    def carry(msg: Any, reply: Any) -> Any:
        if arrives(msg):
            grid._replies.update(late)
            late.clear()
        return reply

    grid.faults[node] = hold
    grid.faults[carrier] = carry


def run(
    cfg: FedsegConfig,
    cohort: tuple[Path, dict[str, list[str]]],
    out: Path,
    *,
    grid: InProcessGrid | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    parts: dict[str, list[str]] | None = None,
    push_pull: bool = False,
) -> tuple[LoopResult, InProcessGrid]:
    root, default_parts = cohort
    # out-dir also tells the simulated sites where to keep their state files
    g, full = make_grid(
        cfg.replace(out_dir=str(out)),
        root,
        parts or default_parts,
        out.parent,
        push_pull=push_pull,
    )
    return serve(grid or g, full, out, progress=progress), grid or g


def saved_site_state(
    out: Path, site: str, server_round: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """What ``site`` saved in ``server_round`` (default: its latest round) in its state file."""
    from fedseg.utils.io import load_torch

    rounds = load_torch(out / "site_state" / f"{site}.pt")["rounds"]
    return site_module.saved_round_state(
        rounds[max(rounds) if server_round is None else server_round]
    )


def tiny_checkpoint(path: Path) -> Path:
    """A ``fedseg-model-v1`` file of an untrained tiny U-Net (16^3, 2 base channels, depth 2)."""
    import torch

    from fedseg.model.unet import build_unet

    cfg = FedsegConfig(image_size=16, patch_size=16, base_channels=2, depth=2)
    torch.manual_seed(0)
    payload = {
        "format": "fedseg-model-v1",
        "config": cfg.to_run_config(),
        "modalities": ["t1", "t1ce", "t2", "flair"],
        "epoch": 1,
        "model": build_unet(cfg).state_dict(),
    }
    torch.save(payload, path)
    return path


@contextmanager
def landmark_spy() -> Iterator[list[np.ndarray]]:
    """The standard landmarks each image is mapped onto (``fedseg.data.harmonise``), recorded
    while the block runs."""
    import pytest

    import fedseg.data.harmonise as harmonise_mod

    seen: list[np.ndarray] = []
    original = harmonise_mod.harmonise_image

    def spy(image: np.ndarray, standard: np.ndarray) -> np.ndarray:
        seen.append(np.asarray(standard))
        return original(image, standard)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harmonise_mod, "harmonise_image", spy)
        yield seen


def load_benchmark(name: str) -> Any:
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def enhanced_mr(files: list[Path], *, keep: bool = False) -> Path:
    """Replace classic slices by one Legacy Converted Enhanced MR file (highdicom), built from
    them in an order that is not the slice order."""
    import logging
    import warnings

    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    from fedseg.clinic.dicom_write import new_uid

    datasets = [pydicom.dcmread(f) for f in files]
    order = [*range(1, len(datasets), 2), *range(0, len(datasets), 2)][::-1]
    first = datasets[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-component PatientName
        logging.disable(logging.WARNING)  # the VOI LUT our slices do not carry
        try:
            image = LegacyConvertedEnhancedMRImage(
                [datasets[i] for i in order],
                series_instance_uid=str(first.SeriesInstanceUID),
                series_number=int(first.SeriesNumber),
                sop_instance_uid=new_uid(),
                instance_number=1,
            )
        finally:
            logging.disable(logging.NOTSET)
    path = files[0].parent / f"ENHANCED_{first.SeriesNumber}"
    image.save_as(path)
    if not keep:
        for f in files:
            f.unlink()
    return path


def transcode_dicom(path: Path, syntax: str) -> None:
    """Compress a DICOM file in place with GDCM (as a PACS or a CD export does)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(path))
    assert writer.Write()
