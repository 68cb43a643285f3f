"""``fedseg serve``: a real HTTP client (httpx) against a running server on loopback."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from helpers import TINY_TRAIN, write_cohort
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic.serve import Service, create_app, public_message
from fedseg.data.case import MODALITIES

TOKEN = "s3cret-token"
LIMIT = 400_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    write_cohort(root / "data", num_cases=5)
    args = ["train", str(root / "data"), "--out", str(root / "run"), "--epochs", "1"]
    args += TINY_TRAIN
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "run", root / "data"


@pytest.fixture(scope="module")
def server(
    trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Service]]:
    """uvicorn serving the tiny model on a free loopback port, in a thread."""
    import uvicorn

    run, _ = trained
    service = Service(
        run, work_dir=tmp_path_factory.mktemp("work"), max_upload_bytes=LIMIT, keep_jobs=50
    )
    config = uvicorn.Config(
        create_app(service, TOKEN), host="127.0.0.1", port=0, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", service
    srv.should_exit = True
    thread.join(timeout=30)
    service.close()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _case_zip(data: Path, case: str, modalities: tuple[str, ...] = MODALITIES) -> bytes:
    return _zip(
        {
            f"{case}/{case}_{m}.nii.gz": (data / case / f"{case}_{m}.nii.gz").read_bytes()
            for m in modalities
        }
    )


def _client(url: str, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _wait(client: httpx.Client, job: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        doc = client.get(f"/jobs/{job}").json()
        if doc["status"] in ("done", "failed") or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def _label_from_result(content: bytes, case: str) -> np.ndarray:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        raw = zf.read(f"{case}_seg.nii.gz")
    img = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(raw))
    return np.asarray(img.dataobj)


def test_upload_status_and_result_match_fedseg_predict(
    server: tuple[str, Service], trained: tuple[Path, Path], tmp_path: Path
) -> None:
    url, _ = server
    run, data = trained
    CliRunner().invoke(app, ["predict", str(run), str(data / "CASE_002"), "--out", str(tmp_path)])
    want = np.asarray(nib.load(tmp_path / "CASE_002_seg.nii.gz").dataobj)

    with _client(url) as client:
        posted = client.post(
            "/jobs",
            content=_case_zip(data, "CASE_002"),
            headers={"Content-Type": "application/zip"},
        )
        doc = _wait(client, posted.json()["job"])
        result = client.get(f"/jobs/{doc['job']}/result")
        deleted = client.delete(f"/jobs/{doc['job']}")
        gone = client.get(f"/jobs/{doc['job']}")

    assert posted.status_code == 202
    assert posted.json()["case"] == "CASE_002"
    assert doc["status"] == "done", doc
    by_predict = json.loads((tmp_path / "volumes.json").read_text())
    assert doc["volumes-ml"] == by_predict["volumes-ml"]
    assert doc["warnings"] == by_predict["warnings"]
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/zip"
    assert np.array_equal(_label_from_result(result.content, "CASE_002"), want)
    assert deleted.status_code == 200
    assert gone.status_code == 404


def test_concurrent_requests_are_all_answered_correctly(
    server: tuple[str, Service], trained: tuple[Path, Path]
) -> None:
    url, _ = server
    _, data = trained
    cases = [f"CASE_{i:03d}" for i in range(4)]

    def one(case: str) -> tuple[str, dict, bytes]:
        with _client(url) as client:
            job = client.post("/jobs", content=_case_zip(data, case)).json()["job"]
            doc = _wait(client, job)
            return case, doc, client.get(f"/jobs/{job}/result").content

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, cases * 2))

    assert [d["status"] for _, d, _ in results] == ["done"] * 8
    assert [d["case"] for _, d, _ in results] == cases * 2
    by_case: dict[str, np.ndarray] = {}
    for case, _, content in results:
        label = _label_from_result(content, case)
        assert label.shape == nib.load(data / case / f"{case}_t1.nii.gz").shape
        if case in by_case:  # the same upload gives the same answer, whatever ran beside it
            assert np.array_equal(label, by_case[case])
        by_case[case] = label


@pytest.mark.parametrize(
    ("headers", "body", "status", "expected"),
    [
        ({"Authorization": "Bearer wrong"}, b"x", 401, "missing or wrong API token"),
        ({}, b"x", 401, "missing or wrong API token"),
        (None, b"not a zip", 400, "not a zip archive"),
        (None, b"", 400, "empty upload"),
        (None, b"\0" * (LIMIT + 1), 413, "over the limit"),
        (None, _zip({"../evil.txt": b"x"}), 400, "points outside the archive"),
        (None, _zip({}), 400, "archive is empty"),
    ],
    ids=["wrong-token", "no-token", "not-zip", "empty", "oversized", "traversal", "empty-zip"],
)
def test_bad_request_gets_one_clear_error(
    headers: dict | None,
    body: bytes,
    status: int,
    expected: str,
    server: tuple[str, Service],
) -> None:
    url, service = server
    h = {"Authorization": f"Bearer {TOKEN}"} if headers is None else headers

    response = httpx.post(f"{url}/jobs", content=body, headers=h, timeout=60)

    assert response.status_code == status
    doc = response.json()
    assert list(doc) == ["error"]
    assert expected in doc["error"]
    assert "\n" not in doc["error"]
    assert str(service.work_dir) not in response.text
    assert "Traceback" not in response.text


def test_bad_case_inside_upload_names_the_problem_without_paths(
    server: tuple[str, Service], trained: tuple[Path, Path]
) -> None:
    url, service = server
    _, data = trained

    with _client(url) as client:
        three = client.post("/jobs", content=_case_zip(data, "CASE_000", MODALITIES[:3]))
        unknown = client.get("/jobs/" + "0" * 32)
        early = client.get("/jobs/../../etc/passwd")

    assert three.status_code == 422
    assert "CASE_000_flair.nii.gz" in three.json()["error"]
    # named as inside the archive, never by the server's folder
    assert three.json()["error"].startswith("CASE_000/CASE_000_flair.nii.gz:")
    assert str(service.work_dir) not in three.text
    assert unknown.status_code == 404 and "no job" in unknown.json()["error"]
    assert early.status_code == 404 and list(early.json()) == ["error"]


def test_result_before_done_is_409(server: tuple[str, Service], trained: tuple[Path, Path]) -> None:
    url, service = server
    _, data = trained
    service.pool.submit(time.sleep, 1.0)  # keep the worker busy so the job stays queued

    with _client(url) as client:
        job = client.post("/jobs", content=_case_zip(data, "CASE_001")).json()["job"]
        early = client.get(f"/jobs/{job}/result")
        _wait(client, job)

    assert early.status_code == 409
    assert "not done" in early.json()["error"]


def test_public_message_drops_server_paths() -> None:
    text = "/srv/work/job-1/input/P1/P1_t1.nii.gz: cannot read\nsecond line"

    assert public_message(text) == "P1_t1.nii.gz: cannot read second line"


def test_serve_refuses_a_model_without_card(
    tmp_path: Path, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    run, _ = trained
    (tmp_path / "m.pt").write_bytes((run / "best.pt").read_bytes())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "m.pt"), "--port", "1"])

    assert result.exit_code == 2
    assert "no model card" in result.stderr
    assert list(scratch.iterdir()) == []  # its own work folder is not left behind


def test_sigterm_stops_serve_and_removes_its_work_folder(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    # systemctl stop and kill send SIGTERM: the uploaded cases must not stay on disk
    import os
    import socket
    import subprocess
    import sys

    run, _ = trained
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(scratch), "FEDSEG_SERVE_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "fedseg.cli", "serve", str(run), "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        assert [p.name[:13] for p in scratch.iterdir()] == ["fedseg-serve-"]

        server.terminate()
        code = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()

    assert code == 0, server.stderr.read() if server.stderr else ""
    assert list(scratch.iterdir()) == []
