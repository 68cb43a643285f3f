"""``fedseg predict`` with too few images says what predict reads and what this model uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.cli.main import app
from fedseg.clinic.predict import load_patient
from fedseg.config import FedsegConfig
from fedseg.errors import LayoutError


def _images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"a_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("uses", "expected"),
    [
        (
            ["flair", "t1ce"],
            "2 image channel(s); predict reads the four modalities t1, t1ce, t2, flair in this "
            "order; this model uses flair, t1ce",
        ),
        (
            ["t1", "t1ce", "t2", "flair"],
            "2 image channel(s), the model needs 4 (t1, t1ce, t2, flair in this order)",
        ),
        (None, "2 image channel(s); predict reads the four modalities t1, t1ce, t2, flair"),
    ],
    ids=["subset-model", "four-modality-model", "model-unknown"],
)
def test_too_few_images_name_what_the_model_uses(
    uses: list[str] | None, expected: str, tmp_path: Path
) -> None:
    files = _images(tmp_path, ["flair", "t1ce"])

    with pytest.raises(LayoutError) as err:
        load_patient(files, uses=uses)

    assert expected in str(err.value)


def test_predict_names_the_cards_modalities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card: dict[str, Any] = {"modalities": ["flair", "t1ce"]}
    monkeypatch.setattr(
        "fedseg.clinic.card.load_carded_model",
        lambda model, device, preset=None: (object(), FedsegConfig(), card),
    )
    monkeypatch.setattr("fedseg.study.evaluate.model_landmarks", lambda model: None)
    files = _images(tmp_path / "in", ["flair", "t1ce"])

    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "m.pt"), *map(str, files), "--out", str(tmp_path / "o")]
    )

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("this model uses flair, t1ce")
    assert "the model needs 4" not in lines[0]
