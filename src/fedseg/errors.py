"""The one exception hierarchy of fedseg.

Every error raised at a boundary (CLI, config, files read from disk, replies from sites)
is a :class:`FedsegError`. Each class carries a short ``code`` so that a site can report
*what kind* of failure happened to the server without sending a traceback, a file path or
a case identifier (see :func:`FedsegError.public`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Self


class FedsegError(Exception):
    """Base class of all fedseg errors."""

    code: str = "E000"

    def public(self) -> str:
        """Return the part of this error that may leave a site: code and class only."""
        return f"{self.code}:{type(self).__name__}"


class ConfigError(FedsegError, ValueError):
    """A configuration key has a bad or unknown value.

    Raised for one key through :meth:`for_key`, the error keeps that ``key`` and the
    ``detail`` after it, so a caller can name the key differently (the CLI names the flag the
    user typed) without reading the message text.
    """

    code = "E100"
    key: str | None = None
    detail: str = ""

    @classmethod
    def for_key(cls, key: str, detail: str) -> Self:
        """``config key 'KEY': DETAIL``, with ``key`` and ``detail`` kept on the error."""
        err = cls(f"config key '{key}': {detail}")
        err.key, err.detail = key, detail
        return err


class ArmSpecError(ConfigError):
    """An experiment's arm is declared wrongly (name, config overrides, seed, phase)."""

    code = "E150"


class DataError(FedsegError):
    """Base class of problems with input data."""

    code = "E200"


class LayoutError(DataError):
    """A folder matches none of the supported dataset layouts."""

    code = "E201"


class MissingModalityError(DataError):
    """A case lacks one of the four MRI modalities (or its label when one is required)."""

    code = "E202"


class CorruptFileError(DataError):
    """A file cannot be read as NIfTI (truncated, not gzip, bad header...)."""

    code = "E203"


class GeometryError(DataError):
    """Shapes, affines or spacings disagree between the files of one case, or are implausible."""

    code = "E204"


class LabelValueError(DataError):
    """A segmentation holds label values that its layout does not allow."""

    code = "E205"


class IntensityError(DataError):
    """An image holds NaN or infinite values, or is empty."""

    code = "E206"


class PartitionError(DataError):
    """Cases cannot be split into sites as asked (bad CSV, too few cases...)."""

    code = "E207"


class DicomSeriesError(DataError):
    """A DICOM series cannot become one modality of a case: not MR, slices missing or
    duplicated, spacing or geometry inconsistent, patients mixed, or no series / two series
    for one modality. The message names the series (number and description)."""

    code = "E210"


class ClinicalDataError(DataError):
    """A clinical CSV is unreadable or holds an unknown/duplicated case id, an out-of-range
    value or an unknown category (the message names file, row and column)."""

    code = "E208"


class HarmonisationError(DataError):
    """Histogram standardisation cannot use an image or a set of landmarks (no foreground
    voxels in a modality, landmarks that are not finite and strictly increasing)."""

    code = "E220"


class CheckpointError(FedsegError):
    """A checkpoint is missing, corrupt, or does not match the model."""

    code = "E300"


class ModelCardError(CheckpointError):
    """A model has no manifest (model card), its manifest is malformed, its weights do not match
    the manifest's hash, or it does not fit what a command needs (preset, input channels)."""

    code = "E310"


class UpdateValidationError(FedsegError):
    """A site's reply (model update) is malformed: keys, shapes, dtypes, non-finite values."""

    code = "E400"


class AggregationError(FedsegError):
    """Updates cannot be combined: bad weights, or arrays whose count or shapes disagree."""

    code = "E401"


class CompressionError(UpdateValidationError):
    """A compressed site update that cannot be decoded (codec, scales, indices or lengths)."""

    code = "E402"


class ProvisionError(FedsegError):
    """Federation key material cannot be created (existing files, unwritable folder...)."""

    code = "E500"


class OutputError(FedsegError):
    """An output folder or file cannot be created or written (read-only mount, a file in the way,
    no permission, disk full)."""

    code = "E800"


class AppNotApprovedError(FedsegError):
    """A site refuses to run an app (FAB) its operator has not approved (``approved-apps.txt``).

    Raised at the site before any code of the app is loaded; the message holds only the app's
    hash, never a path, so it may travel to the server in Flower's error reply.
    """

    code = "E510"


class DeviceMemoryError(FedsegError):
    """Training ran out of memory on its device (a GPU): the patch or the batch is too large."""

    code = "E900"


class TrainingDivergedError(FedsegError):
    """Training produced a non-finite loss (NaN or inf): the weights are no longer usable. The
    message names the epoch, the learning rate and what was kept."""

    code = "E910"


class DeploymentError(FedsegError):
    """A deployed site or server cannot start or keep running: its ClientApp process cannot
    reach its SuperNode, a folder it must write is not writable, or its state was written by
    another Flower version. The message names the file or address and what was expected."""

    code = "E520"


class PrivacyBudgetError(FedsegError):
    """A site refuses a round that would take it past its differential-privacy budget."""

    code = "E600"


class SitePolicyError(FedsegError):
    """A site refuses a request that its own privacy policy does not allow.

    Unlike other errors, a policy refusal tells the server *why*: ``public_reason`` names the
    policy, what the request asked and what the policy requires. It is built only from the
    policy and the request (never from the site's data, paths or case ids), so it may leave the
    site; :func:`fedseg.federation.records.error_content` sends it beside the code.
    """

    code = "E700"

    def __init__(self, message: str, *, public_reason: str | None = None) -> None:
        super().__init__(message)
        self.public_reason = public_reason if public_reason is not None else message


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'X'?"`` for the choice closest to ``value`` (difflib), or ``""``.

    The tail of a refusal that names what was expected: ``f"... expected a, b{hint}"``.
    """
    import difflib

    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
