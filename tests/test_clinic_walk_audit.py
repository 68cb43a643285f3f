"""The clinic commands as a hospital user meets them: files given in the wrong order, uploads
without a case folder, deleting a running job, restarting the service, odd tokens and names.

The service tests stand a fake model in for the real one (loading and predicting are replaced):
what is checked is the service's handling of jobs, files and requests.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import write_cohort

from fedseg.clinic import predict as predict_module
from fedseg.clinic.predict import (
    Prediction,
    case_name_from_files,
    load_patient,
    modality_of_name,
)
from fedseg.clinic.serve import LOCK_FILE, RequestError, Service, create_app, safe_extract
from fedseg.data.case import MODALITIES
from fedseg.errors import LayoutError, OutputError

TOKEN = "t0ken"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("walk") / "data"
    write_cohort(root, num_cases=1)
    return root


def _files(cohort: Path, order: tuple[str, ...] = MODALITIES) -> list[Path]:
    return [cohort / "CASE_000" / f"CASE_000_{m}.nii.gz" for m in order]


def _renamed(cohort: Path, tmp_path: Path, names: list[str]) -> list[Path]:
    """The case's four images (t1, t1ce, t2, flair) copied under ``names``."""
    out = []
    for src, name in zip(_files(cohort), names, strict=True):
        dst = tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        out.append(dst)
    return out


# --------------------------------------------------------------------------------------------
# predict: NIfTI files given as a list


@pytest.mark.parametrize(
    ("order", "named", "says"),
    [
        (("flair", "t2", "t1ce", "t1"), "CASE_000_flair.nii.gz", "flair"),
        (("t1ce", "t1", "t2", "flair"), "CASE_000_t1ce.nii.gz", "t1ce"),
        (("t1", "t1ce", "flair", "t2"), "CASE_000_flair.nii.gz", "flair"),
    ],
)
def test_bad_order_of_named_nifti_files_is_refused(
    cohort: Path, order: tuple[str, ...], named: str, says: str
) -> None:
    # read in the given order, a FLAIR taken for the T1 gave another segmentation, silently
    with pytest.raises(LayoutError) as info:
        load_patient(_files(cohort, order))

    message = str(info.value)
    assert named in message
    assert f"its name says {says}" in message
    assert "expected the files in the order t1 t1ce t2 flair" in message


def test_bad_order_of_brats2023_names_is_refused(cohort: Path, tmp_path: Path) -> None:
    names = [f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1c", "t1n", "t2w", "t2f")]

    with pytest.raises(LayoutError, match="given as image 1 \\(t1\\) but its name says t1ce"):
        load_patient(_renamed(cohort, tmp_path, names))


def test_files_in_order_or_without_modality_names_are_read_as_given(
    cohort: Path, tmp_path: Path
) -> None:
    plain = _renamed(cohort, tmp_path / "a", ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"])

    named = load_patient(_files(cohort))
    anonymous = load_patient(plain)

    assert np.array_equal(named.case.image, anonymous.case.image)


@pytest.mark.parametrize(
    ("names", "case"),
    [
        # the README's own example: t1.nii.gz t1ce.nii.gz ... in a patient's folder
        (["patient-17/t1.nii.gz", "x/t1ce.nii.gz", "x/t2.nii.gz", "x/flair.nii.gz"], "patient-17"),
        ([f"d/BraTS-GLI-00002-000-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")],
         "BraTS-GLI-00002-000"),
        ([f"d/SYN_7_{m}.nii.gz" for m in MODALITIES], "SYN_7"),
    ],
)  # fmt: skip
def test_case_is_named_after_the_files_not_their_modality(
    cohort: Path, tmp_path: Path, names: list[str], case: str
) -> None:
    files = _renamed(cohort, tmp_path, names)

    patient = load_patient(files)

    assert patient.case.case_id == case
    assert case_name_from_files(files) == case


def test_a_folder_of_cases_is_named_as_such(tmp_path: Path) -> None:
    # before: "no DICOM image found (expected a folder of DICOM series)"
    write_cohort(tmp_path / "data", num_cases=2)

    with pytest.raises(LayoutError) as info:
        load_patient([tmp_path / "data"])

    assert "holds 2 cases (CASE_000, CASE_001)" in str(info.value)
    assert "DICOM" not in str(info.value)


def test_a_folder_of_one_case_folder_is_that_case(cohort: Path) -> None:
    patient = load_patient([cohort])

    assert patient.case.case_id == "CASE_000"
    assert patient.case.label is None


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("x_t1.nii.gz", "t1"),
        ("x-t1n.nii.gz", "t1"),
        ("x_t1ce.nii", "t1ce"),
        ("x-t1c.nii.gz", "t1ce"),
        ("T2.nii.gz", "t2"),
        ("x_t2_flair.nii.gz", "flair"),
        ("x-t2f.nii.gz", "flair"),
        ("sub-01_T1w.nii.gz", "t1"),
        ("sub-01_ce-gadolinium_T1w.nii.gz", "t1ce"),  # BIDS names the contrast, not the suffix
        ("sub-01_FLAIR.nii.gz", "flair"),
        ("x_seg.nii.gz", None),
        ("image.nii.gz", None),
    ],
)
def test_modality_of_name(name: str, modality: str | None) -> None:
    assert modality_of_name(Path(name)) == modality


# --------------------------------------------------------------------------------------------
# serve: a service around a fake model


class _FakePredict:
    """Stands in for ``predict_patient``: waits for ``release``, then writes one file."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.cases: list[str] = []
        self.images: list[np.ndarray] = []

    def __call__(
        self, model: Any, cfg: Any, card: Any, patient: Any, out: Path, *a: Any, **k: Any
    ) -> Prediction:
        self.cases.append(patient.case.case_id)
        self.images.append(patient.case.image)
        self.started.set()
        assert self.release.wait(30)
        out.mkdir(parents=True, exist_ok=True)  # as the real one does: parents too
        name = f"{patient.case.case_id}_seg.nii.gz"
        (out / name).write_bytes(b"label")
        return Prediction(patient.case.case_id, {"WT": 1.0, "TC": 0.5, "ET": 0.25}, [name], 0.0)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakePredict]:
    import fedseg.clinic.card
    import fedseg.study.evaluate

    card = {"strategy": "fedavg", "preset": "cpu-demo", "sha256": "0" * 64}
    monkeypatch.setattr(
        fedseg.clinic.card, "load_carded_model", lambda *a, **k: (object(), object(), card)
    )
    monkeypatch.setattr(fedseg.study.evaluate, "model_landmarks", lambda *a, **k: None)
    spy = _FakePredict()
    monkeypatch.setattr(predict_module, "predict_patient", spy)
    yield spy
    spy.release.set()


def _service(work: Path, **kw: Any) -> Service:
    return Service(Path("model.pt"), work_dir=work, max_upload_bytes=10_000_000, **kw)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _case_zip(cohort: Path, folder: str = "CASE_000/", stem: str = "CASE_000") -> bytes:
    images = zip(MODALITIES, _files(cohort), strict=True)
    return _zip({f"{folder}{stem}_{m}.nii.gz": p.read_bytes() for m, p in images})


def _job_folders(work: Path) -> list[Path]:
    return sorted(p for p in work.iterdir() if p.name.startswith("job-"))


def test_files_at_the_top_of_the_archive_keep_their_case_name(
    fake: _FakePredict, cohort: Path, tmp_path: Path
) -> None:
    # before: the case took the name of the server's extraction folder ("input")
    service = _service(tmp_path / "work")
    try:
        answer = service.submit(_case_zip(cohort, folder="", stem="SYN_00042"))
    finally:
        fake.release.set()
        service.close()

    assert answer["case"] == "SYN_00042"


def test_flat_archive_in_another_order_is_read_by_the_names(
    fake: _FakePredict, cohort: Path, tmp_path: Path
) -> None:
    # zip members come in any order: the files' names say which modality each holds
    files = {"flair.nii.gz": _files(cohort)[3].read_bytes()}
    images = zip(MODALITIES[:3], _files(cohort)[:3], strict=True)
    files.update({f"{m}.nii.gz": p.read_bytes() for m, p in images})
    service = _service(tmp_path / "work")
    try:
        service.submit(_zip(files))
        assert fake.started.wait(30)
    finally:
        fake.release.set()
        service.close()
    reference = load_patient(_files(cohort)).case.image

    assert fake.cases == ["case"]  # not the server's folder's name
    assert np.array_equal(fake.images[0], reference)


def test_answer_to_an_upload_says_queued(fake: _FakePredict, cohort: Path, tmp_path: Path) -> None:
    service = _service(tmp_path / "work")
    try:
        answer = service.submit(_case_zip(cohort))
        assert fake.started.wait(30)  # the worker took it at once
    finally:
        fake.release.set()
        service.close()

    assert answer["status"] == "queued"


def test_deleting_a_running_job_leaves_no_file(
    fake: _FakePredict, cohort: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    service = _service(work)
    try:
        job = service.submit(_case_zip(cohort))["job"]
        assert fake.started.wait(30)
        service.forget(job)
        fake.release.set()  # the prediction goes on and writes its result folder again
        service.pool.submit(lambda: None).result(timeout=30)  # the worker is done with it
        left = _job_folders(work)
    finally:
        fake.release.set()
        service.close()

    assert left == []
    with pytest.raises(RequestError) as info:
        service.get(job)
    assert info.value.status == 404


def test_deleting_a_queued_job_does_not_run_it(
    fake: _FakePredict, cohort: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    service = _service(work)
    try:
        service.submit(_case_zip(cohort, stem="FIRST"))
        assert fake.started.wait(30)
        second = service.submit(_case_zip(cohort, stem="SECOND"))["job"]
        service.forget(second)
        fake.release.set()
        service.pool.submit(lambda: None).result(timeout=30)
        left = len(_job_folders(work))
    finally:
        fake.release.set()
        service.close()

    assert fake.cases == ["CASE_000"]  # the first upload's case folder names it
    assert left == 1  # the first job's result only


def test_uploads_beyond_max_queued_get_503(
    fake: _FakePredict, cohort: Path, tmp_path: Path
) -> None:
    # each queued upload holds its images in memory: the queue is bounded
    service = _service(tmp_path / "work", max_queued=1)
    try:
        service.submit(_case_zip(cohort))  # taken by the worker: no longer waiting
        assert fake.started.wait(30)
        service.submit(_case_zip(cohort))  # waits
        with pytest.raises(RequestError) as info:
            service.submit(_case_zip(cohort))
        folders = len(_job_folders(tmp_path / "work"))
    finally:
        fake.release.set()
        service.close()

    assert info.value.status == 503
    assert "limit 1" in info.value.message
    assert folders == 2  # the refused upload left nothing


def test_restart_deletes_the_job_folders_a_killed_service_left(
    fake: _FakePredict, cohort: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    first = _service(work)
    fake.release.set()
    job = first.submit(_case_zip(cohort))["job"]
    first.pool.shutdown(wait=True)
    # killed: close() never ran, its lock goes with the process
    import os

    assert first._lock_fd is not None
    os.close(first._lock_fd)
    assert len(_job_folders(work)) == 1

    second = _service(work)
    try:
        left = _job_folders(work)
        with pytest.raises(RequestError) as info:
            second.get(job)
    finally:
        second.close()

    assert left == []
    assert info.value.status == 404
    assert "before the service restarted" in info.value.message


def test_a_new_work_folder_keeps_what_it_holds(fake: _FakePredict, tmp_path: Path) -> None:
    # only a folder an earlier service used is cleaned: a user's own job-* folder stays
    work = tmp_path / "work"
    (work / "job-2024").mkdir(parents=True)

    service = _service(work)
    service.close()

    assert (work / "job-2024").is_dir()
    assert (work / LOCK_FILE).is_file()


def test_two_services_on_one_work_folder_are_refused(fake: _FakePredict, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = _service(work)
    try:
        with pytest.raises(OutputError, match="another fedseg serve is using it"):
            _service(work)
    finally:
        first.close()


@pytest.fixture
def client(fake: _FakePredict, tmp_path: Path) -> Iterator[TestClient]:
    service = _service(tmp_path / "work")
    with TestClient(create_app(service, TOKEN)) as c:
        yield c
    fake.release.set()
    service.close()


@pytest.mark.parametrize(
    "header",
    [
        "Bearer tök€n",  # non-ASCII: compare_digest raised TypeError, a 500
        "Bearer wrong",
        "Basic t0ken",
        "",
    ],
)
def test_bad_token_is_401(client: TestClient, header: str) -> None:
    headers = {"Authorization": header.encode("utf-8")} if header else {}

    answer = client.get("/health", headers=headers)

    assert answer.status_code == 401
    assert "API token" in answer.json()["error"]


def test_result_of_a_case_with_a_non_ascii_name_can_be_downloaded(
    client: TestClient, fake: _FakePredict, cohort: Path
) -> None:
    # a header holds latin-1 only: the case name in Content-Disposition gave a 500
    auth = {"Authorization": f"Bearer {TOKEN}"}
    posted = client.post(
        "/jobs", content=_case_zip(cohort, folder="Müller €/", stem="Müller €"), headers=auth
    )
    job = posted.json()["job"]
    fake.release.set()
    for _ in range(300):
        if client.get(f"/jobs/{job}", headers=auth).json()["status"] == "done":
            break
        fake.started.wait(0.1)  # a short pause, without sleeping the test in time.sleep

    result = client.get(f"/jobs/{job}/result", headers=auth)

    assert posted.status_code == 202
    assert posted.json()["case"] == "Müller €"
    assert result.status_code == 200
    assert result.headers["content-disposition"] == 'attachment; filename="M_ller-result.zip"'


def test_archive_with_too_many_members_is_413(tmp_path: Path) -> None:
    data = _zip({f"f{i}.dcm": b"" for i in range(11)})

    with pytest.raises(RequestError) as info:
        safe_extract(data, tmp_path / "x", 1000, max_members=10)

    assert info.value.status == 413
    assert "11 members, limit 10" in info.value.message
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# evaluate: an external folder


@pytest.fixture
def external(tmp_path: Path) -> tuple[Path, Path]:
    """Two labelled cases and an untrained model."""
    from helpers import tiny_checkpoint

    write_cohort(tmp_path / "data", num_cases=2)
    return tiny_checkpoint(tmp_path / "model.pt"), tmp_path / "data"


def _evaluate(*args: Path | str) -> Any:
    from typer.testing import CliRunner

    from fedseg.cli.main import app

    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_a_bad_label_half_way_leaves_out_as_it_was(
    external: tuple[Path, Path], tmp_path: Path
) -> None:
    # before: the first case's prediction was written beside an earlier run's metrics.csv
    import nibabel as nib

    model, data = external
    seg = data / "CASE_001" / "CASE_001_seg.nii.gz"
    img = nib.load(seg)
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, img.affine), seg)
    out = tmp_path / "pred"
    out.mkdir()
    (out / "metrics.csv").write_text("an earlier run\n")

    result = _evaluate(model, data, "--out", out, "--no-hd95", "--no-brats")

    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "CASE_001_seg.nii.gz" in errors[0] and "[7]" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv"]
    assert (out / "metrics.csv").read_text() == "an earlier run\n"


def test_unlabelled_folder_says_nothing_was_scored(
    external: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = external
    for seg in data.glob("*/*_seg.nii.gz"):
        seg.unlink()
    out = tmp_path / "pred"

    result = _evaluate(model, data, "--out", out, "--no-hd95", "--no-brats")

    assert result.exit_code == 0, result.output
    assert "2 cases segmented" in result.stdout
    assert "no case has a reference label" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "CASE_000.nii.gz",
        "CASE_001.nii.gz",
        "metrics.csv",
        "summary.json",
    ]


def test_overlay_marks_the_patients_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # shown in neurological convention (patient's left on the image's left), unlike a PACS
    # viewer: unmarked, the overlay's sides were left to be guessed
    from matplotlib.axes import Axes

    from fedseg.clinic.predict import write_overlay

    written: list[str] = []
    original = Axes.text

    def spy(self: Axes, x: float, y: float, s: str, *a: Any, **k: Any) -> Any:
        written.append(s)
        return original(self, x, y, s, *a, **k)

    monkeypatch.setattr(Axes, "text", spy)
    image = np.zeros((8, 8, 8), np.float32)
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 3] = 2

    write_overlay(image, label, tmp_path / "o.png", "CASE", np.eye(4))

    assert sorted(written) == ["A", "L", "P", "R"]
    assert (tmp_path / "o.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# serve: the command


def test_a_busy_port_is_one_line_and_exit_2(fake: _FakePredict, tmp_path: Path) -> None:
    # before: "serving ... on http://..." was printed, then uvicorn's own error, exit 1
    import socket

    from typer.testing import CliRunner

    from fedseg.cli.main import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["serve", "m.pt", "--port", str(port), "--work-dir", str(tmp_path / "w")]
        result = CliRunner().invoke(app, args, env={"FEDSEG_SERVE_TOKEN": TOKEN})

    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use); "
        "expected a free port of this machine (is another fedseg serve running on it?)"
    ]
    _service(tmp_path / "w").close()  # the work folder was released


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_bad_port_is_refused(port: int) -> None:
    # getaddrinfo wraps 99999 round to 34463: the service listened on a port nobody asked for
    from fedseg.cli.serve import listen_socket
    from fedseg.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--port {port}: out of range"):
        listen_socket("127.0.0.1", port)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_bad_et_min_volume_is_named_as_the_option_before_the_model_loads(
    command: str, value: str, tmp_path: Path
) -> None:
    # before: "config key 'et-min-volume' ...", once the model had been loaded
    from typer.testing import CliRunner

    from fedseg.cli.main import app

    args = [command, str(tmp_path / "no-model.pt"), str(tmp_path), "--out", str(tmp_path / "o")]

    result = CliRunner().invoke(app, [*args, "--et-min-volume", value])

    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --et-min-volume {float(value)}: expected a number of mm³ >= 0 (0 = off)"
    ]


def test_a_full_queue_is_503_over_http(fake: _FakePredict, cohort: Path, tmp_path: Path) -> None:
    service = _service(tmp_path / "work", max_queued=1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with TestClient(create_app(service, TOKEN)) as client:
            first = client.post("/jobs", content=_case_zip(cohort), headers=auth)
            assert fake.started.wait(30)
            second = client.post("/jobs", content=_case_zip(cohort), headers=auth)
            third = client.post("/jobs", content=_case_zip(cohort), headers=auth)
    finally:
        fake.release.set()
        service.close()

    assert [first.status_code, second.status_code, third.status_code] == [202, 202, 503]
    assert "send this one again when a job is done" in third.json()["error"]
