"""Federated histogram standardisation: the landmark exchange before the first round.

With ``harmonise = "histogram"`` the server first sends every site a ``query`` with
``want = "landmarks"``. Each site answers with, per modality, the mean of its training images'
standard-scale landmarks and how many images that mean covers
(:func:`fedseg.data.harmonise.site_landmarks`): a ``(modalities, 11)`` array and a count
vector, never an image or one case's histogram (a site with fewer than
:data:`MIN_SITE_IMAGES` usable training images in a modality refuses). The server checks every
reply (shapes, finite, strictly increasing, counts >= 1) and leaves a bad one out with its
reason, as it does with malformed model updates; the count-weighted mean of the valid replies
is the standard (:func:`combine_site_landmarks`). It travels to the sites in the config of
every training and evaluation message (:data:`LANDMARKS`), each site maps its cases onto it
before training or scoring, and the run folder keeps it in :data:`LANDMARKS_FILE` for scoring
the model elsewhere (an unseen hospital maps its own cases with the same standard).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedseg.config import FedsegConfig
from fedseg.data.harmonise import PERCENTILES, average_landmarks, check_landmarks
from fedseg.errors import AggregationError, HarmonisationError, UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.messaging import send_and_receive

log = logging.getLogger("fedseg.server")

__all__ = [
    "LANDMARKS",
    "LANDMARKS_FILE",
    "MIN_SITE_IMAGES",
    "WANT",
    "collect_landmarks",
    "combine_site_landmarks",
    "landmark_reply",
    "landmarks_config",
    "load_landmarks",
    "parse_landmark_reply",
    "save_landmarks",
    "standard_from_config",
]

#: the ``want`` of the landmark query
WANT = "landmarks"
#: the config key carrying the standard landmarks (flattened, modality-major) to the sites
LANDMARKS = "harmonise-landmarks"
#: the file of the run folder holding the standard landmarks
LANDMARKS_FILE = "landmarks.json"
#: fewest training images a site averages per modality before its landmarks may leave it
MIN_SITE_IMAGES = 2
_COUNTS = "counts"


def landmark_reply(landmarks: np.ndarray, counts: np.ndarray, site: str) -> RecordDict:
    """A site's answer to the landmark query.

    Raises
    ------
    HarmonisationError
        A modality averages fewer than :data:`MIN_SITE_IMAGES` images (one case's landmarks
        would leave the site).
    """
    few = [i for i, n in enumerate(np.asarray(counts).tolist()) if n < MIN_SITE_IMAGES]
    if few:
        raise HarmonisationError(
            f"modality {few[0]} has {int(counts[few[0]])} usable training image(s): at least "
            f"{MIN_SITE_IMAGES} are needed so that no single case's landmarks leave the site"
        )
    arrays = {WANT: np.asarray(landmarks, np.float64), _COUNTS: np.asarray(counts, np.float64)}
    return RecordDict(
        {
            R.ARRAYS: R.to_array_record(arrays),
            R.METRICS: MetricRecord({"num-examples": int(np.max(counts))}),
            R.SITE: R.site_record(site),
        }
    )


def parse_landmark_reply(reply: Message) -> tuple[np.ndarray, np.ndarray]:
    """One site's landmarks ``(modalities, 11)`` and counts ``(modalities,)``, checked.

    Raises
    ------
    UpdateValidationError
        No content, the site's error code, missing arrays, wrong shapes, landmarks that are
        not finite and strictly increasing, or counts that are not integers >= 1.
    """
    arrays = R.reply_arrays(reply)
    if sorted(arrays) != sorted((WANT, _COUNTS)):
        raise UpdateValidationError(
            f"expected arrays '{WANT}' and '{_COUNTS}', found {sorted(arrays)}"
        )
    landmarks, counts = arrays[WANT], arrays[_COUNTS]
    if landmarks.ndim != 2 or counts.shape != (landmarks.shape[0],):
        raise UpdateValidationError(
            f"landmarks of shape {landmarks.shape} with counts of shape {counts.shape}: "
            f"expected (modalities, {len(PERCENTILES)}) and (modalities,)"
        )
    try:
        checked = check_landmarks(landmarks)
    except HarmonisationError as exc:
        raise UpdateValidationError(str(exc)) from None
    if not (np.isfinite(counts).all() and (counts >= 1).all() and (counts % 1 == 0).all()):
        raise UpdateValidationError(f"counts must be integers >= 1, found {counts.tolist()}")
    return checked, counts.astype(np.int64)


def combine_site_landmarks(
    landmarks: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> np.ndarray:
    """The standard: per modality, the count-weighted mean of the sites' landmarks.

    Raises
    ------
    HarmonisationError
        No site, or sites with different numbers of modalities.
    """
    if not landmarks:
        raise HarmonisationError("no site landmarks to combine")
    shapes = {np.shape(v) for v in landmarks}
    if len(shapes) != 1:
        raise HarmonisationError(f"sites sent landmarks of different shapes: {sorted(shapes)}")
    channels = np.shape(landmarks[0])[0]
    return np.stack(
        [
            average_landmarks([v[c] for v in landmarks], [float(n[c]) for n in counts])
            for c in range(channels)
        ]
    )


def collect_landmarks(grid: Grid, cfg: FedsegConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Ask every connected site for its landmarks and combine the valid replies.

    Returns
    -------
    tuple
        The standard ``(modalities, 11)`` and what happened: ``sites`` (the sites averaged,
        with their counts) and ``rejected`` (site or node to the reason it was left out).

    Raises
    ------
    AggregationError
        No site sent valid landmarks.
    """
    nodes = list(grid.get_node_ids())
    content = RecordDict({R.CONFIG: ConfigRecord({"want": WANT})})
    messages = [Message(content, n, MessageType.QUERY) for n in nodes]
    replies = send_and_receive(grid, messages, timeout=cfg.round_timeout)
    landmarks: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    used: dict[str, list[int]] = {}
    rejected: dict[str, str] = {}
    for reply in replies:
        site = R.reply_site_name(reply.content) if reply.has_content() else None
        who = site or f"node {reply.metadata.src_node_id}"
        try:
            lm, n = parse_landmark_reply(reply)
        except UpdateValidationError as exc:
            log.warning("harmonise: landmarks of %s left out: %s", who, exc)
            rejected[who] = str(exc)
            continue
        landmarks.append(lm)
        counts.append(n)
        used[who] = n.tolist()
    if not landmarks:
        raise AggregationError(
            f"harmonise 'histogram': no valid landmarks from {len(nodes)} site(s): "
            + "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
        )
    try:
        standard = combine_site_landmarks(landmarks, counts)
    except HarmonisationError as exc:
        raise AggregationError(f"harmonise 'histogram': {exc}") from None
    log.info("harmonise: standard landmarks averaged over %d of %d sites", len(used), len(nodes))
    return standard, {"sites": used, "rejected": rejected}


def landmarks_config(standard: np.ndarray) -> dict[str, list[float]]:
    """The config entry carrying ``standard`` to the sites (:data:`LANDMARKS`)."""
    return {LANDMARKS: [float(x) for x in np.asarray(standard, dtype=np.float64).reshape(-1)]}


def standard_from_config(conf: Mapping[str, Any]) -> np.ndarray:
    """The standard landmarks a message carries, checked.

    Raises
    ------
    UpdateValidationError
        The key is missing, or its values are not finite, strictly increasing landmarks.
    """
    if LANDMARKS not in conf:
        raise UpdateValidationError(
            f"harmonise 'histogram': the message has no '{LANDMARKS}' (the server's standard)"
        )
    flat = np.asarray(conf[LANDMARKS], dtype=np.float64)
    if flat.ndim != 1 or flat.size == 0 or flat.size % len(PERCENTILES):
        raise UpdateValidationError(
            f"'{LANDMARKS}': expected a multiple of {len(PERCENTILES)} values, found {flat.size}"
        )
    try:
        return check_landmarks(flat.reshape(-1, len(PERCENTILES)))
    except HarmonisationError as exc:
        raise UpdateValidationError(f"'{LANDMARKS}': {exc}") from None


def save_landmarks(path: Path, standard: np.ndarray, info: Mapping[str, Any]) -> Path:
    """Write the standard (and who contributed) to ``path`` as JSON, atomically."""
    from fedseg.utils.io import atomic_write_json

    doc = {
        "method": "histogram",
        "percentiles": list(PERCENTILES),
        "landmarks": np.asarray(standard, dtype=np.float64).tolist(),
        **dict(info),
    }
    atomic_write_json(path, doc)
    return path


def load_landmarks(path: Path) -> np.ndarray:
    """The standard landmarks of a run folder's :data:`LANDMARKS_FILE`, checked.

    Raises
    ------
    HarmonisationError
        The file is missing or unreadable, or holds no valid landmarks.
    """
    import json

    try:
        doc = json.loads(Path(path).read_text())
        landmarks = doc["landmarks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HarmonisationError(f"{path}: not a readable landmarks file ({exc})") from None
    try:
        return check_landmarks(np.asarray(landmarks, dtype=np.float64))
    except (HarmonisationError, ValueError) as exc:
        raise HarmonisationError(f"{path}: {exc}") from None
