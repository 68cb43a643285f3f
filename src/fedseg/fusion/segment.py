"""The segmentation model whose predicted regions give the fusion models their image features.

A new patient has no reference label map, so by default the image features
(:data:`fedseg.fusion.features.IMAGE_FEATURES`) are computed inside the regions a fedseg
segmentation model predicts (:func:`fedseg.model.inference.predict_regions`, the sliding-window
inference of ``fedseg evaluate`` and ``fedseg predict``). The model is a file with its card
(:func:`fedseg.clinic.card.load_carded_model`), given by the user or trained by
:func:`train_segmentation`: FedAvg over the same sites, on their training cases only (each
site's ``test-fraction`` split, the one the fusion study scores on, is never trained on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.errors import CheckpointError, ModelCardError

#: the segmentation run's folder inside a fusion study
SEGMENTATION_DIR = "segmentation"


@dataclass(frozen=True)
class SegModel:
    """A loaded segmentation model with what its predictions need.

    Attributes
    ----------
    path:
        The model file.
    sha256:
        Of the weights (from the checked card): part of every cache key of its predictions.
    net, cfg, modalities:
        The network, its configuration and input channels.
    card:
        The model card.
    device:
        Where it runs.
    """

    path: Path
    sha256: str
    net: Any
    cfg: Any
    modalities: tuple[str, ...]
    card: dict[str, Any]
    device: Any


_MODELS: dict[tuple[str, int, int], SegModel] = {}


def load_seg_model(path: Path) -> SegModel:
    """Load a fedseg segmentation model that has a valid card (cached per process).

    Parameters
    ----------
    path:
        Model file (``final_model.pt``, ``best.pt``) or run folder.

    Returns
    -------
    SegModel

    Raises
    ------
    ModelCardError
        No card, a card that does not match the weights, or a config fedseg cannot rebuild.
    CheckpointError
        Not a fedseg model.
    """
    from fedseg.clinic.card import load_carded_model, resolve_model
    from fedseg.utils.runtime import pick_device

    model_path = resolve_model(Path(path))
    st = model_path.stat()
    key = (str(model_path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MODELS:
        device = pick_device()
        net, cfg, card = load_carded_model(model_path, device)
        _MODELS[key] = SegModel(
            model_path, str(card["sha256"]), net, cfg, tuple(card["modalities"]), card, device
        )
    return _MODELS[key]


def predicted_label(model: SegModel, case: Any) -> Any:
    """The BraTS label map (0, 1, 2, 4) the model predicts for a case, on the case's grid.

    Parameters
    ----------
    model:
        From :func:`load_seg_model`.
    case:
        A :class:`fedseg.data.case.Case` (images in ``MODALITIES`` order; its label unused).

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(X, Y, Z)``.
    """
    import numpy as np

    from fedseg.data.case import regions_to_label
    from fedseg.model.inference import predict_regions

    regions = predict_regions(model.net, model.cfg, model.modalities, case, model.device)
    return regions_to_label(regions).astype(np.uint8)


def segmentation_config(
    seed: int, test_fraction: float, rounds: int, overrides: Mapping[str, Any] | None = None
) -> Any:
    """The configuration of the segmentation federation a fusion study trains.

    The ``cpu-demo`` network and FedAvg, ``rounds`` rounds of one local epoch, the study's
    ``seed`` and ``test-fraction`` (so every site holds out exactly the cases the fusion models
    are scored on), then ``overrides`` (kebab-case keys).

    Raises
    ------
    ConfigError
        A bad override.
    """
    from fedseg.config import FedsegConfig

    base = {
        "strategy": "fedavg",
        "num-server-rounds": rounds,
        "local-epochs": 1,
        "seed": seed,
        "test-fraction": test_fraction,
        "val-fraction": 0.0,
    }
    return FedsegConfig.from_run_config({**base, **dict(overrides or {})})


def train_segmentation(
    data: Path,
    sites: Mapping[str, list[str]],
    out: Path,
    cfg: Any,
    say: Callable[[str], None] = lambda s: None,
) -> Path:
    """Train the segmentation model with FedAvg over the sites, or reuse the one in ``out``.

    Parameters
    ----------
    data:
        The cohort folder.
    sites:
        Site name to case ids (each site trains on its own ``split_cases`` training part).
    out:
        The run folder (``final_model.pt`` and its card, ``history.json``); a finished run of
        the same config and sites is reused, an interrupted one resumed.
    cfg:
        From :func:`segmentation_config`.
    say:
        Receives one-line progress messages.

    Returns
    -------
    pathlib.Path
        The model file (``out/final_model.pt``, with its card).
    """
    from fedseg.clinic.card import read_card
    from fedseg.data.partition import read_partition
    from fedseg.experiment.engine import PARTITION_CSV, run_federation

    model = Path(out) / "final_model.pt"
    if model.is_file() and (Path(out) / PARTITION_CSV).is_file():
        try:
            card = read_card(model)
        except (ModelCardError, CheckpointError):
            card = {}
        same_sites = {s: sorted(v) for s, v in read_partition(Path(out) / PARTITION_CSV).items()}
        mine = {k: v for k, v in cfg.to_run_config().items() if k not in _RUN_KEYS}
        theirs = {k: v for k, v in dict(card.get("config", {})).items() if k not in _RUN_KEYS}
        if mine == theirs and same_sites == {s: sorted(v) for s, v in sites.items()}:
            say(f"reusing the segmentation model {model}")
            return model

    def progress(rnd: int, total: int, row: dict[str, Any]) -> None:
        dice = row.get("mean-dice") or {}
        shown = [f"{r} {v:.3f}" for r, v in dice.items() if isinstance(v, float)]
        tail = f", test Dice {' '.join(shown)}" if shown else ""
        say(f"segmentation round {rnd}/{total}{tail}")

    say(
        f"training the segmentation model: FedAvg, {cfg.num_server_rounds} rounds over "
        f"{len(sites)} sites' training cases"
    )
    run_federation(cfg, Path(data), sites, Path(out), engine="inprocess", progress=progress)
    return model


# keys a federation's runner sets per run folder: not part of what decides the model
_RUN_KEYS = ("data-path", "partition-file", "out-dir", "num-sites", "cache-dir")
