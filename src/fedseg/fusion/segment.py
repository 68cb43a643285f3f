"""The segmentation model whose predicted regions give the fusion models their image features.

A new patient has no reference label map, so by default the image features
(:data:`fedseg.fusion.features.IMAGE_FEATURES`) are computed inside the regions a fedseg
segmentation model predicts (:func:`fedseg.model.inference.predict_regions`, the sliding-window
inference of ``fedseg evaluate`` and ``fedseg predict``). The model is a file with its card
(:func:`fedseg.clinic.card.load_carded_model`), given by the user or trained by
:func:`fedseg.fusion.seg_training.train_segmentation`: FedAvg over the same sites, on their
training cases only (each site's ``test-fraction`` split, the one the fusion study scores on,
is never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
