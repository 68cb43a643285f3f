"""``fedseg serve``: a local HTTP service (FastAPI) for one-patient predictions.

Every request carries the API token (``Authorization: Bearer TOKEN``). Every error is one JSON
object ``{"error": "<one line>"}`` with the HTTP status; no file path of the server and no
traceback ever leaves it (internal failures are logged on the server).

``POST /jobs``
    Body: a zip archive (``Content-Type: application/zip``) of one patient: a BraTS case folder
    or its four files ``<case>_t1/_t1ce/_t2/_flair.nii.gz``, or DICOM files (any names, series
    matched as ``fedseg import-dicom`` does). Larger than the upload limit: 413. The images are
    read and checked before the answer (bad input: 400/422 naming the file inside the archive);
    the prediction is queued. Answer 202 ``{"job", "status": "queued", "case"}``.
``GET /jobs/{job}``
    ``{"job", "status": queued|running|done|failed, "case", "volumes-ml", "files", "warnings",
    "error"}`` (``warnings``: what makes the segmentation implausible, empty when nothing does).
``GET /jobs/{job}/result``
    The result files (label map, DICOM SEG for DICOM input, volumes.json, overlay.png) as a zip;
    409 while the job is not done.
``DELETE /jobs/{job}``
    Forget a job and delete its files; a queued job is not run, a running one's files are
    deleted as soon as its prediction stops.
``GET /health``
    The model's strategy, preset and sha256.

Jobs are kept in memory: after a restart the earlier jobs are unknown (404), and the files a
stopped or killed service left in ``--work-dir`` are deleted when the next one starts there.
At most ``max_queued`` uploads wait for prediction (each holds its images in memory); one more
is answered 503 until one is done.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (Request),
# which are imported inside create_app, when the endpoints are defined.
import errno
import hmac
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError

log = logging.getLogger(__name__)

#: Environment variable holding the API token when no --token-file is given.
TOKEN_ENV = "FEDSEG_SERVE_TOKEN"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_ABS_PATH = re.compile(r"(?:/[^\s/:'\",;()]+)+/([^\s/:'\",;()]+)")
#: an archive may expand to at most this many times the upload limit (zip bombs)
_EXPANSION = 8
#: most members an archive may hold (a DICOM series is one file per slice: four series of a
#: few hundred slices each fit many times over)
MAX_MEMBERS = 20_000
#: the file in the work folder that one running service holds locked
LOCK_FILE = ".fedseg-serve.lock"
#: prefix of each job's folder in the work folder
_JOB_PREFIX = "job-"
#: the folder of a job's folder that its upload is extracted into: the case's name when the
#: archive's files are at its top and their names hold no case name (t1.nii.gz, ...)
_UPLOAD = "case"


class RequestError(Exception):
    """A bad request: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Job:
    """One upload and its prediction."""

    id: str
    folder: Path
    case: str = ""
    status: str = "queued"
    error: str | None = None
    volumes: dict[str, float] | None = None
    files: list[str] = field(default_factory=list)
    #: what makes the segmentation implausible (:func:`fedseg.clinic.predict.plausibility_warnings`)
    warnings: list[str] = field(default_factory=list)
    #: the images read at upload, until the prediction has run
    patient: Any = None

    def public(self) -> dict[str, Any]:
        """What the client may see."""
        return {
            "job": self.id,
            "status": self.status,
            "case": self.case,
            "volumes-ml": self.volumes,
            "files": list(self.files),
            "warnings": list(self.warnings),
            "error": self.error,
        }


def public_message(text: str, folder: Path | None = None) -> str:
    """``text`` as one line with the server's paths removed (only file names remain)."""
    if folder is not None:
        text = text.replace(str(folder) + os.sep, "").replace(str(folder), "upload")
    text = _ABS_PATH.sub(r"\1", text)
    return " ".join(text.split())


def safe_extract(data: bytes, dest: Path, limit: int, max_members: int = MAX_MEMBERS) -> None:
    """Extract a zip archive held in memory into ``dest``, refusing anything unsafe.

    Parameters
    ----------
    data:
        The archive.
    dest:
        The folder to extract into.
    limit:
        Most bytes the members may expand to.
    max_members:
        Most members the archive may hold.

    Raises
    ------
    RequestError
        Not a zip archive (400), a member with an absolute path or ``..`` (400), more than
        ``limit`` bytes once expanded or more than ``max_members`` members (413).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise RequestError(400, "upload is not a zip archive (expected application/zip)") from None
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise RequestError(413, f"archive holds {len(members)} members, limit {max_members}")
        total = sum(m.file_size for m in members)
        if total > limit:
            raise RequestError(413, f"archive expands to {total} bytes, limit {limit}")
        root = dest.resolve()
        for m in members:
            target = (dest / m.filename).resolve()
            if m.filename.startswith(("/", "\\")) or root not in (target, *target.parents):
                raise RequestError(400, f"archive member '{m.filename}' points outside the archive")
        try:
            archive.extractall(dest)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise RequestError(400, f"archive cannot be extracted ({type(exc).__name__})") from None


def _inputs(folder: Path) -> list[Path]:
    """The ``load_patient`` inputs inside an extracted upload.

    A case folder is read as one (the case is named after it). Files at the top of the archive
    are given as files, in the order t1, t1ce, t2, flair their names say, so that the case is
    named after them rather than after the server's extraction folder.
    """
    from fedseg.clinic.predict import modality_of_name

    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise RequestError(400, "archive is empty (expected one patient's images)")
    nifti = [p for p in files if p.name.endswith((".nii", ".nii.gz"))]
    if not nifti:
        return [folder]  # DICOM files, read by the DICOM importer
    parents = {p.parent for p in nifti}
    if len(parents) != 1:
        raise RequestError(400, "NIfTI files in several folders; expected one case")
    parent = parents.pop()
    if parent != folder:
        return [parent]
    by_modality: dict[str, list[Path]] = {}
    for p in sorted(nifti):
        modality = modality_of_name(p)
        if modality is not None:
            by_modality.setdefault(modality, []).append(p)
    from fedseg.data.case import MODALITIES

    if all(len(by_modality.get(m, [])) == 1 for m in MODALITIES):
        return [by_modality[m][0] for m in MODALITIES]
    if len(nifti) == 1:  # one 4D file of four channels
        return nifti
    return [folder]


def _download_name(case: str) -> str:
    """A ``Content-Disposition`` file name for ``case``'s result: ASCII letters, digits and
    ``._-`` only (a header holds latin-1, and a quote would end the name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case).strip("._")
    return f"{safe or 'case'}-result.zip"


class Service:
    """The jobs of one served model; predictions run one at a time on a worker thread."""

    def __init__(
        self,
        model_path: Path,
        *,
        work_dir: Path,
        max_upload_bytes: int,
        keep_jobs: int = 100,
        preset: str | None = None,
        max_queued: int = 16,
    ) -> None:
        """Load the model and take the work folder.

        Parameters
        ----------
        model_path:
            The exported model (with its card) or its run folder.
        work_dir:
            Where each job's upload and result are kept. The service holds it locked while
            it runs; job folders an earlier service left there (killed, crashed) are deleted.
        max_upload_bytes:
            Largest upload accepted.
        keep_jobs:
            Finished jobs kept; the oldest are forgotten (and their files deleted) beyond it.
        preset:
            Refuse a model that does not come from this preset.
        max_queued:
            Most uploads waiting for prediction at once; one more is answered 503.

        Raises
        ------
        OutputError
            Another service is running on ``work_dir``.
        ModelCardError, CheckpointError
            As :func:`fedseg.clinic.card.load_carded_model` raises them.
        """
        from fedseg.clinic.card import load_carded_model
        from fedseg.study.evaluate import model_landmarks
        from fedseg.utils.runtime import pick_device

        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # refuse a busy work folder before the minutes a model can take to load
        self._lock_fd = _lock_work_dir(self.work_dir)
        try:
            self.device = pick_device()
            self.model, self.cfg, self.card = load_carded_model(
                model_path, self.device, preset=preset
            )
            self.landmarks = model_landmarks(model_path)
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self.max_upload_bytes = int(max_upload_bytes)
        self.keep_jobs = keep_jobs
        self.max_queued = int(max_queued)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self._waiting = 0  # uploads being read or queued, under self.lock
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedseg-predict")

    def submit(self, data: bytes) -> dict[str, Any]:
        """Check one upload, read its images and queue its prediction.

        Parameters
        ----------
        data:
            The zip archive of one patient.

        Returns
        -------
        dict
            The job as the client sees it (:meth:`Job.public`), status ``queued``.

        Raises
        ------
        RequestError
            503 when ``max_queued`` uploads already wait; 400/413 a bad archive
            (:func:`safe_extract`); 422 images that cannot be read (named inside the archive).
        """
        from fedseg.clinic.predict import load_patient

        with self.lock:
            self._check_queue()
            self._waiting += 1
        queued = False
        try:
            job = Job(
                uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix=_JOB_PREFIX, dir=self.work_dir))
            )
            try:
                safe_extract(data, job.folder / _UPLOAD, _EXPANSION * self.max_upload_bytes)
                job.patient = load_patient(_inputs(job.folder / _UPLOAD))
            except FedsegError as exc:
                shutil.rmtree(job.folder, ignore_errors=True)
                raise RequestError(422, public_message(str(exc), job.folder / _UPLOAD)) from None
            except BaseException:
                shutil.rmtree(job.folder, ignore_errors=True)
                raise
            job.case = job.patient.case.case_id
            with self.lock:
                self.jobs[job.id] = job
                self._evict()
                answer = job.public()  # before the worker can start it
            self.pool.submit(self._run, job)
            queued = True
        finally:
            if not queued:
                with self.lock:
                    self._waiting -= 1
        return answer

    def _check_queue(self) -> None:
        """Raise 503 when ``max_queued`` uploads wait already (called under ``self.lock``)."""
        if self._waiting >= self.max_queued:
            raise RequestError(
                503,
                f"{self._waiting} uploads are waiting for prediction (limit "
                f"{self.max_queued}); send this one again when a job is done",
            )

    def check_queue(self) -> None:
        """Raise 503 when ``max_queued`` uploads wait already: before an upload is read.

        Raises
        ------
        RequestError
            503, the queue is full.
        """
        with self.lock:
            self._check_queue()

    def _run(self, job: Job) -> None:
        from fedseg.clinic.predict import predict_patient

        with self.lock:
            self._waiting -= 1
            patient, job.patient = job.patient, None
            if job.id not in self.jobs:  # deleted while queued: its files are gone already
                return
            job.status = "running"
        result: Any = None
        error: str | None = None
        try:
            result = predict_patient(
                self.model,
                self.cfg,
                self.card,
                patient,
                job.folder / "result",
                self.device,
                landmarks=self.landmarks,
            )
        except FedsegError as exc:
            error = public_message(str(exc), job.folder)
        except Exception:
            if self._deleted(job):  # its folder went away under the prediction
                return
            # the server log keeps the traceback; the client gets one line
            log.exception("job %s failed", job.id)
            error = "internal error while predicting; see the server log"
        # the DICOM SEG reads the uploaded T1ce series: the upload goes only now
        shutil.rmtree(job.folder / _UPLOAD, ignore_errors=True)
        if self._deleted(job):
            return
        with self.lock:
            if result is not None:
                job.volumes, job.files = result.volumes_ml, result.files
                job.warnings = list(result.warnings)
            job.status, job.error = ("failed", error) if result is None else ("done", None)

    def _deleted(self, job: Job) -> bool:
        """Whether ``job`` was deleted while it ran; if so, delete what its prediction wrote
        since (the prediction makes its result folder again)."""
        with self.lock:
            gone = job.id not in self.jobs
        if gone:
            shutil.rmtree(job.folder, ignore_errors=True)
        return gone

    def _evict(self) -> None:
        """Forget the oldest finished jobs beyond ``keep_jobs`` (called under ``self.lock``)."""
        finished = [j for j in self.jobs.values() if j.status in ("done", "failed")]
        for job in finished[: max(0, len(self.jobs) - self.keep_jobs)]:
            self.jobs.pop(job.id, None)
            shutil.rmtree(job.folder, ignore_errors=True)

    def get(self, job_id: str) -> Job:
        """The job, or 404."""
        with self.lock:
            job = self.jobs.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None:
            raise RequestError(
                404,
                f"no job '{job_id[:40]}' (deleted, dropped as one of the oldest beyond the "
                f"{self.keep_jobs} kept, or made before the service restarted)",
            )
        return job

    def forget(self, job_id: str) -> None:
        """Drop a job and its files; a queued job will not run, a running one's files are
        deleted again when its prediction stops."""
        with self.lock:
            job = self.jobs.pop(job_id, None)
        if job is not None:
            shutil.rmtree(job.folder, ignore_errors=True)

    def result_zip(self, job: Job) -> bytes:
        """The result files of a finished job, zipped.

        Raises
        ------
        RequestError
            409 while the job is not done; 404 when it was deleted meanwhile.
        """
        if job.status != "done":
            raise RequestError(409, f"job {job.id} is {job.status}, not done")
        buf = io.BytesIO()
        try:
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
                for name in job.files:
                    zf.write(job.folder / "result" / name, name)
        except FileNotFoundError:  # deleted (DELETE, eviction) while it was being read
            raise RequestError(404, f"job {job.id} was deleted") from None
        return buf.getvalue()

    def close(self) -> None:
        """Stop the worker, delete every job's files and release the work folder."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for job_id in list(self.jobs):
            self.forget(job_id)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None


def _lock_work_dir(work_dir: Path) -> int | None:
    """Lock ``work_dir`` for this service and delete the job folders an earlier one left.

    Jobs live in the service's memory: a job folder found at start belongs to a service that
    was killed or crashed, and no request can reach it any more (it holds patient images
    and results, so it is not left lying there). Only a folder that holds the lock file of an
    earlier service is cleaned: a new folder's contents are never touched.

    Returns
    -------
    int or None
        The open lock file, held until :meth:`Service.close`; ``None`` where the platform has
        no ``fcntl`` (nothing is cleaned there).

    Raises
    ------
    OutputError
        Another service holds ``work_dir``, or the lock file cannot be made.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    from fedseg.errors import OutputError

    path = work_dir / LOCK_FILE
    served_before = path.exists()  # only then can job-* folders here be a service's
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise OutputError(
            f"--work-dir {work_dir}: cannot make {LOCK_FILE} there ({exc.strerror})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputError(
                f"--work-dir {work_dir}: another fedseg serve is using it (expected a work "
                "folder of its own for each service)"
            ) from None
        raise OutputError(f"--work-dir {work_dir}: cannot lock it ({exc.strerror})") from None
    stale = [p for p in work_dir.glob(f"{_JOB_PREFIX}*") if p.is_dir() and not p.is_symlink()]
    if not served_before:
        stale = []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        log.warning("deleted %d job folder(s) left by an earlier service", len(stale))
    return fd


def create_app(service: Service, token: str) -> Any:
    """The FastAPI application around ``service``, guarded by ``token``."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    if not token:
        raise ValueError("an API token is required")
    app = FastAPI(title="fedseg", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, public_message(str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"bad request: {where} {first.get('msg', '')}".strip())

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return error(500, "internal error; see the server log")

    expected = token.encode("utf-8")

    def check_token(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500)
        given_token = value.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_token, expected):
            raise RequestError(
                401, "missing or wrong API token (header Authorization: Bearer TOKEN)"
            )

    guarded = [Depends(check_token)]

    @app.get("/health", dependencies=guarded)
    def health() -> dict[str, Any]:
        card = service.card
        return {
            "status": "ok",
            "strategy": card["strategy"],
            "preset": card["preset"],
            "model-sha256": card["sha256"],
        }

    @app.post("/jobs", status_code=202, dependencies=guarded)
    async def submit(request: Request) -> JSONResponse:
        limit = service.max_upload_bytes
        service.check_queue()  # a full queue is told before the upload is read
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"upload of {declared} bytes is over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"upload is over the limit of {limit} bytes")
            chunks.append(chunk)
        if not size:
            raise RequestError(400, "empty upload (expected a zip archive of one patient)")
        from starlette.concurrency import run_in_threadpool

        answer = await run_in_threadpool(service.submit, b"".join(chunks))
        return JSONResponse(answer, status_code=202)

    @app.get("/jobs/{job_id}", dependencies=guarded)
    def status(job_id: str) -> dict[str, Any]:
        return service.get(job_id).public()

    @app.get("/jobs/{job_id}/result", dependencies=guarded)
    def result(job_id: str) -> Response:
        job = service.get(job_id)
        return Response(
            service.result_zip(job),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{_download_name(job.case)}"'},
        )

    @app.delete("/jobs/{job_id}", dependencies=guarded)
    def delete(job_id: str) -> dict[str, Any]:
        service.forget(service.get(job_id).id)
        return {"job": job_id, "status": "deleted"}

    return app
