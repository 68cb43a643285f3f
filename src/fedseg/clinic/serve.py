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
    ``{"job", "status": queued|running|done|failed, "case", "volumes-ml", "files", "error"}``.
``GET /jobs/{job}/result``
    The result files (label map, DICOM SEG for DICOM input, volumes.json, overlay.png) as a zip;
    409 while the job is not done.
``DELETE /jobs/{job}``
    Forget a job and delete its files.
``GET /health``
    The model's strategy, preset and sha256.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (Request),
# which are imported inside create_app, when the endpoints are defined.
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

    def public(self) -> dict[str, Any]:
        """What the client may see."""
        return {
            "job": self.id,
            "status": self.status,
            "case": self.case,
            "volumes-ml": self.volumes,
            "files": list(self.files),
            "error": self.error,
        }


def public_message(text: str, folder: Path | None = None) -> str:
    """``text`` as one line with the server's paths removed (only file names remain)."""
    if folder is not None:
        text = text.replace(str(folder) + os.sep, "").replace(str(folder), "upload")
    text = _ABS_PATH.sub(r"\1", text)
    return " ".join(text.split())


def safe_extract(data: bytes, dest: Path, limit: int) -> None:
    """Extract a zip archive held in memory into ``dest``, refusing anything unsafe.

    Raises
    ------
    RequestError
        Not a zip archive (400), a member with an absolute path or ``..`` (400), or more than
        ``limit`` bytes once expanded (413).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise RequestError(400, "upload is not a zip archive (expected application/zip)") from None
    with archive:
        members = archive.infolist()
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
    """The ``load_patient`` inputs inside an extracted upload."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise RequestError(400, "archive is empty (expected one patient's images)")
    nifti = [p for p in files if p.name.endswith((".nii", ".nii.gz"))]
    if not nifti:
        return [folder]  # DICOM files, read by the DICOM importer
    parents = {p.parent for p in nifti}
    if len(parents) != 1:
        raise RequestError(400, "NIfTI files in several folders; expected one case")
    return [parents.pop()]


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
    ) -> None:
        from fedseg.clinic.card import load_carded_model
        from fedseg.study.evaluate import model_landmarks
        from fedseg.utils.runtime import pick_device

        self.device = pick_device()
        self.model, self.cfg, self.card = load_carded_model(model_path, self.device, preset=preset)
        self.landmarks = model_landmarks(model_path)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_bytes)
        self.keep_jobs = keep_jobs
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedseg-predict")

    def submit(self, data: bytes) -> Job:
        """Check one upload, read its images and queue its prediction."""
        from fedseg.clinic.predict import load_patient

        job = Job(uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix="job-", dir=self.work_dir)))
        try:
            safe_extract(data, job.folder / "input", _EXPANSION * self.max_upload_bytes)
            patient = load_patient(_inputs(job.folder / "input"))
        except FedsegError as exc:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise RequestError(422, public_message(str(exc), job.folder / "input")) from None
        except RequestError:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise
        job.case = patient.case.case_id
        with self.lock:
            self.jobs[job.id] = job
            self._evict()
        self.pool.submit(self._run, job, patient)
        return job

    def _run(self, job: Job, patient: Any) -> None:
        from fedseg.clinic.predict import predict_patient

        job.status = "running"
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
            job.status, job.error = "failed", public_message(str(exc), job.folder)
            return
        except Exception:  # the server log keeps the traceback; the client gets one line
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", "internal error while predicting; see the server log"
            return
        finally:
            shutil.rmtree(job.folder / "input", ignore_errors=True)
        job.volumes, job.files, job.status = result.volumes_ml, result.files, "done"

    def _evict(self) -> None:
        finished = [j for j in self.jobs.values() if j.status in ("done", "failed")]
        for job in finished[: max(0, len(self.jobs) - self.keep_jobs)]:
            self.forget(job.id)

    def get(self, job_id: str) -> Job:
        """The job, or 404."""
        job = self.jobs.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None:
            raise RequestError(404, f"no job '{job_id[:40]}'")
        return job

    def forget(self, job_id: str) -> None:
        """Drop a job and its files."""
        job = self.jobs.pop(job_id, None)
        if job is not None:
            shutil.rmtree(job.folder, ignore_errors=True)

    def result_zip(self, job: Job) -> bytes:
        """The result files of a finished job, zipped."""
        if job.status != "done":
            raise RequestError(409, f"job {job.id} is {job.status}, not done")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name in job.files:
                zf.write(job.folder / "result" / name, name)
        return buf.getvalue()

    def close(self) -> None:
        """Stop the worker and delete every job's files."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for job_id in list(self.jobs):
            self.forget(job_id)


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

    def check_token(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
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

        job = await run_in_threadpool(service.submit, b"".join(chunks))
        return JSONResponse(job.public(), status_code=202)

    @app.get("/jobs/{job_id}", dependencies=guarded)
    def status(job_id: str) -> dict[str, Any]:
        return service.get(job_id).public()

    @app.get("/jobs/{job_id}/result", dependencies=guarded)
    def result(job_id: str) -> Response:
        job = service.get(job_id)
        return Response(
            service.result_zip(job),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{job.case}-result.zip"'},
        )

    @app.delete("/jobs/{job_id}", dependencies=guarded)
    def delete(job_id: str) -> dict[str, Any]:
        service.forget(service.get(job_id).id)
        return {"job": job_id, "status": "deleted"}

    return app
