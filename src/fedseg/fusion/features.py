"""Feature vectors of a case for the fusion models: tumour regions, clinical record, both.

Image features (:data:`IMAGE_FEATURES`) come from the tumour regions of a label map in BraTS
2021 numbering (the reference segmentation, or a predicted one) and the images inside them:

``log_wt`` / ``log_tc`` / ``log_et``
    ``log(1 + volume in ml)`` of WT, TC and ET, centred.
``et_tc``
    ET volume / TC volume (how much of the core enhances).
``ncr_tc``
    label 1 (necrosis and non-enhancing tumour) / TC.
``ed_wt``
    oedema (label 2) / WT.
``sphericity``
    of TC: ``pi^(1/3) (6 V)^(2/3) / A`` with the voxel-face surface area (1 for a sphere).
``t1ce_et`` / ``t1ce_core`` / ``t2_core``
    log ratio of the median T1ce in ET, T1ce in label 1 and T2 in label 1 to the median of the
    same modality in the brain outside the tumour (enhancement and necrosis). Only voxels inside
    the brain (intensity > 0) count, and the log ratio is clipped to [-3, 3]: a predicted
    region that spills into the background would otherwise give log(1e-6) = -14 and swamp every
    other feature.

Clinical features (:func:`clinical_features`): age, sex, KPS, IDH, MGMT and resection coded
around fixed reference values (binary fields as +1 / -1, 0 when missing), each with a
missing-value indicator, so a case with missing fields is kept; for the survival endpoint the
WHO grade is a feature as well (for the grade endpoint it is the target). The codings use fixed
constants only, never statistics of the data, so every site computes the same features without
sharing anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.config import FUSION_ENDPOINTS, FUSION_FEATURE_SETS, FUSION_IMAGE_SOURCES
from fedseg.data.clinical import ClinicalRecord
from fedseg.errors import ConfigError
from fedseg.fusion.segment import SegModel, predicted_label

#: the prediction targets: WHO grade 4 vs 2-3 (classification), overall survival (Cox)
ENDPOINTS: tuple[str, ...] = FUSION_ENDPOINTS
#: the feature sets compared by the study
FEATURE_SETS: tuple[str, ...] = FUSION_FEATURE_SETS
#: where the image features' regions come from: a segmentation model's prediction (what a new
#: patient has), or the reference label maps (an upper bound)
IMAGE_SOURCES: tuple[str, ...] = FUSION_IMAGE_SOURCES
#: names of the image features, in vector order
IMAGE_FEATURES: tuple[str, ...] = (
    "log_wt",
    "log_tc",
    "log_et",
    "et_tc",
    "ncr_tc",
    "ed_wt",
    "sphericity",
    "t1ce_et",
    "t1ce_core",
    "t2_core",
)
_CLINICAL_BASE: tuple[str, ...] = (
    "age",
    "male",
    "kps",
    "idh_mutant",
    "mgmt_methylated",
    "resection_gtr",
    "resection_str",
    "age_missing",
    "sex_missing",
    "kps_missing",
    "idh_missing",
    "mgmt_missing",
    "resection_missing",
)
_GRADE_FEATURES: tuple[str, ...] = ("grade_3", "grade_4", "grade_missing")


def check_choice(key: str, value: str, allowed: Sequence[str]) -> str:
    """Return ``value`` if allowed, else raise :class:`ConfigError` naming ``key``."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def feature_names(endpoint: str, features: str) -> tuple[str, ...]:
    """The names of the feature vector's entries for an endpoint and a feature set.

    Parameters
    ----------
    endpoint:
        One of :data:`ENDPOINTS`.
    features:
        One of :data:`FEATURE_SETS`.

    Returns
    -------
    tuple of str
        In vector order.

    Raises
    ------
    ConfigError
        An unknown endpoint or feature set.
    """
    check_choice("endpoint", endpoint, ENDPOINTS)
    check_choice("features", features, FEATURE_SETS)
    clinical = _CLINICAL_BASE + (_GRADE_FEATURES if endpoint == "survival" else ())
    if features == "image":
        return IMAGE_FEATURES
    if features == "clinical":
        return clinical
    return IMAGE_FEATURES + clinical


#: bound of the intensity log ratios (a factor of e^3 = 20 either way)
_LOG_RATIO_BOUND = 3.0


def _median_ratio(values: np.ndarray, reference: float) -> float:
    values = values[values > 0]  # inside the brain
    if values.size == 0 or reference <= 0:
        return 0.0
    ratio = math.log(float(np.median(values)) / reference)
    return float(min(max(ratio, -_LOG_RATIO_BOUND), _LOG_RATIO_BOUND))


def _surface_faces(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Area (mm^2) of the voxel faces between ``mask`` and the rest."""
    padded = np.pad(mask, 1)
    area = 0.0
    for axis in range(3):
        faces = np.count_nonzero(np.diff(padded, axis=axis))
        others = [spacing[k] for k in range(3) if k != axis]
        area += faces * others[0] * others[1]
    return area


def image_features(
    label: np.ndarray, image: np.ndarray | None, spacing: Sequence[float]
) -> np.ndarray:
    """The image features (:data:`IMAGE_FEATURES`) of one case.

    Parameters
    ----------
    label:
        ``(X, Y, Z)`` label map in BraTS 2021 numbering (0, 1, 2, 4).
    image:
        ``(4, X, Y, Z)`` images in ``t1, t1ce, t2, flair`` order (0 outside the brain), or
        ``None`` (the three intensity features are then 0).
    spacing:
        Voxel size in mm along each axis.

    Returns
    -------
    numpy.ndarray
        ``float64`` vector of length ``len(IMAGE_FEATURES)``.
    """
    ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(label.ravel().astype(np.int64), minlength=5)
    ncr, ed, et = float(counts[1]), float(counts[2]), float(counts[4])
    tc, wt = ncr + et, ncr + ed + et
    core = (label == 1) | (label == 4)
    sphericity = 0.0
    if tc > 0:
        volume = tc * ml * 1000.0
        area = _surface_faces(core, spacing)
        sphericity = math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / max(area, 1e-6)
    t1ce_et = t1ce_core = t2_core = 0.0
    if image is not None:
        normal = (label == 0) & (image[1] > 0)
        if normal.any():
            ref_t1ce = float(np.median(image[1][normal]))
            ref_t2 = float(np.median(image[2][normal]))
            t1ce_et = _median_ratio(image[1][label == 4], ref_t1ce)
            t1ce_core = _median_ratio(image[1][label == 1], ref_t1ce)
            t2_core = _median_ratio(image[2][label == 1], ref_t2)
    return np.array(
        [
            math.log1p(wt * ml) - 3.5,
            math.log1p(tc * ml) - 2.7,
            math.log1p(et * ml) - 2.0,
            et / tc if tc else 0.0,
            ncr / tc if tc else 0.0,
            ed / wt if wt else 0.0,
            sphericity,
            t1ce_et,
            t1ce_core,
            t2_core,
        ],
        dtype=np.float64,
    )


def _signed(value: object, positive: str) -> float:
    if value is None:
        return 0.0
    return 1.0 if value == positive else -1.0


def clinical_features(record: Mapping[str, object], endpoint: str) -> np.ndarray:
    """The clinical features of one record (see the module docstring).

    Parameters
    ----------
    record:
        A :data:`fedseg.data.clinical.ClinicalRecord` (missing fields ``None``).
    endpoint:
        One of :data:`ENDPOINTS`; ``survival`` adds the WHO grade.

    Returns
    -------
    numpy.ndarray
        ``float64`` vector, names :func:`feature_names` ``(endpoint, "clinical")``.
    """
    age, kps, resection = record.get("age"), record.get("kps"), record.get("resection")
    values = [
        0.0 if age is None else (float(age) - 55.0) / 15.0,  # type: ignore[arg-type]
        _signed(record.get("sex"), "M"),
        0.0 if kps is None else (float(kps) - 80.0) / 15.0,  # type: ignore[arg-type]
        _signed(record.get("idh"), "mutant"),
        _signed(record.get("mgmt"), "methylated"),
        float(resection == "GTR"),
        float(resection == "STR"),
    ]
    values += [float(record.get(f) is None) for f in ("age", "sex", "kps", "idh", "mgmt")]
    values.append(float(resection is None))
    if endpoint == "survival":
        grade = record.get("who_grade")
        values += [float(grade == 3), float(grade == 4), float(grade is None)]
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class FusionData:
    """The design matrix and targets of some cases for one endpoint and feature set.

    ``y`` is 1 for WHO grade 4 (grade endpoint); ``time`` / ``event`` are the survival in days
    and 1 for a death, 0 for a censored time (survival endpoint). Cases without the endpoint
    are left out.
    """

    case_ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    time: np.ndarray
    event: np.ndarray

    def __len__(self) -> int:
        return len(self.case_ids)


def has_endpoint(record: Mapping[str, object], endpoint: str) -> bool:
    """Whether a record has what ``endpoint`` needs (a grade; a survival time and status)."""
    if endpoint == "grade":
        return record.get("who_grade") is not None
    return record.get("survival_days") is not None and record.get("vital_status") is not None


def build_data(
    case_ids: Sequence[str],
    records: Mapping[str, ClinicalRecord],
    image_vectors: Mapping[str, np.ndarray],
    endpoint: str,
    features: str,
) -> FusionData:
    """Assemble :class:`FusionData` from per-case image vectors and clinical records.

    Parameters
    ----------
    case_ids:
        The cases, in order.
    records:
        case id -> clinical record (a case without one counts as all-missing).
    image_vectors:
        case id -> :func:`image_features` (needed for ``image`` and ``fusion``).
    endpoint, features:
        See :data:`ENDPOINTS`, :data:`FEATURE_SETS`.

    Returns
    -------
    FusionData
        Only the cases whose record has the endpoint.
    """
    from fedseg.data.clinical import empty_record

    names = feature_names(endpoint, features)
    ids, rows, y, time, event = [], [], [], [], []
    for cid in case_ids:
        rec = records.get(cid) or empty_record()
        if not has_endpoint(rec, endpoint):
            continue
        parts = []
        if features in ("image", "fusion"):
            parts.append(image_vectors[cid])
        if features in ("clinical", "fusion"):
            parts.append(clinical_features(rec, endpoint))
        ids.append(cid)
        rows.append(np.concatenate(parts))
        y.append(float(rec.get("who_grade") == 4))
        time.append(float(rec.get("survival_days") or 0.0))  # type: ignore[arg-type]
        event.append(float(rec.get("vital_status") == "dead"))
    x = np.vstack(rows) if rows else np.zeros((0, len(names)))
    return FusionData(tuple(ids), x, np.asarray(y), np.asarray(time), np.asarray(event))


_CACHE: dict[tuple[str, int, int, str], np.ndarray] = {}


def case_image_features(
    root: Path, case_ids: Sequence[str], seg_model: SegModel | None = None
) -> dict[str, np.ndarray]:
    """Image features of cases of a dataset folder, from predicted or reference regions.

    Cached per process by image files (path, size, time) and model, so that a site and the
    study in one process read and segment each case once.

    Parameters
    ----------
    root:
        The dataset folder (any layout :func:`fedseg.data.readers.discover_cases` reads).
    case_ids:
        The cases wanted.
    seg_model:
        The segmentation model whose predicted regions are used
        (:func:`fedseg.fusion.segment.load_seg_model`); ``None``: the cases' reference label
        maps (an upper bound: a new patient has none).

    Returns
    -------
    dict of str to numpy.ndarray
        case id -> :func:`image_features`.

    Raises
    ------
    MissingModalityError
        A case is not in the folder, or (reference regions) has no label.
    fedseg.errors.DataError
        Whatever the readers raise for a case they cannot read.
    """
    from fedseg.data.readers import discover_cases, load_case
    from fedseg.errors import MissingModalityError

    refs = {r.case_id: r for r in discover_cases(Path(root))}
    out: dict[str, np.ndarray] = {}
    for cid in case_ids:
        ref = refs.get(cid)
        if ref is None:
            raise MissingModalityError(f"{root}: no case {cid!r} in this folder")
        if seg_model is None and ref.label is None:
            raise MissingModalityError(f"{root}: case {cid!r} has no label")
        stamp = ref.label if seg_model is None else next(iter(ref.images.values()))
        st = os.stat(str(stamp))
        key = (str(stamp), st.st_size, st.st_mtime_ns, seg_model.sha256 if seg_model else "")
        if key not in _CACHE:
            case = load_case(ref, require_label=seg_model is None, validate=False)
            spacing = np.sqrt((np.asarray(case.affine)[:3, :3] ** 2).sum(axis=0))
            label = case.label if seg_model is None else predicted_label(seg_model, case)
            _CACHE[key] = image_features(label, case.image, spacing)  # type: ignore[arg-type]
        out[cid] = _CACHE[key]
    return out
