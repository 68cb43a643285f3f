"""Air-gapped install: ``wheelhouse/`` alone installs fedseg into a fresh venv with no network.

The install runs inside ``unshare -n`` (a new network namespace holding only a downed loopback:
no route to anything) with pip's configuration files ignored, so neither an index nor the
machine's local wheel folders can help. ``wheelhouse/`` is built with ``make wheelhouse`` when
missing (that step uses the package index, as on the connected machine that prepares the
folder; pip's cache makes a rebuild quick). Installing torch and the rest takes a minute or two:
the test is marked ``slow``; ``FEDSEG_SKIP_WHEELHOUSE=1`` leaves it out of a quick local run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "wheelhouse"


def _why_not() -> str | None:
    if os.environ.get("FEDSEG_SKIP_WHEELHOUSE") == "1":
        return "FEDSEG_SKIP_WHEELHOUSE=1 leaves out the air-gapped install (~2 min)"
    if os.geteuid() != 0:
        return "unshare -n (a namespace without network) needs root"
    if shutil.which("unshare") is None:
        return "the 'unshare' tool (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n does not work here: {probe.stderr.strip()}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def _offline_env(tmp: Path) -> dict[str, str]:
    # PYTHON*: e.g. the PYTHONPATH Flower's Ray backend exports in this process would make pip
    # see this checkout's fedseg as "already installed" and skip it.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))
    }
    env |= {
        "PIP_CONFIG_FILE": os.devnull,  # no index, no find-links, no constraints from config
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "HOME": str(tmp),
        "OMP_NUM_THREADS": "1",
    }
    return env


def test_install_from_wheelhouse_without_network(tmp_path: Path) -> None:
    if not any(WHEELHOUSE.glob("fedseg-*.whl")) or not any(WHEELHOUSE.glob("torch-*.whl")):
        built = subprocess.run(["make", "wheelhouse"], cwd=ROOT, capture_output=True, text=True)
        assert built.returncode == 0, built.stderr[-3000:]
    venv = tmp_path / "venv"
    env = _offline_env(tmp_path)
    base = getattr(sys, "_base_executable", sys.executable)
    t0 = time.perf_counter()
    install = subprocess.run(
        [
            "unshare", "-n", "sh", "-c",
            # --no-compile: byte-compiling torch's sources is most of the time and proves
            # nothing about the network; Python compiles what it imports anyway.
            f'"{base}" -m venv "{venv}" && "{venv}/bin/pip" install -q --no-compile '
            f'--no-index --find-links "{WHEELHOUSE}" fedseg',
        ],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]

    check = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 443), timeout=2)\n"
        "    raise SystemExit('network reachable')\n"
        "except OSError:\n"
        "    pass\n"
        "import fedseg, flwr, monai, torch\n"
        "print(torch.__version__, flwr.__version__, monai.__version__)\n"
        "print(fedseg.__file__)\n"
    )
    used = subprocess.run(
        ["unshare", "-n", f"{venv}/bin/python", "-c", check],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert used.returncode == 0, used.stderr[-2000:]
    versions, where = used.stdout.split("\n")[:2]
    assert versions.split() == ["2.13.0+cpu", "1.41.0", "1.6.1"]
    assert where.startswith(str(venv)), f"fedseg imported from {where}, not the new venv"
    cli = subprocess.run(
        ["unshare", "-n", f"{venv}/bin/fedseg", "--help"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "provision" in cli.stdout
    print(f"air-gapped install from {WHEELHOUSE}: {seconds:.0f} s")
