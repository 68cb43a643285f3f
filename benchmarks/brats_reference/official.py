"""Score prediction/reference NIfTI pairs with the official BraTS evaluator (run in its venv).

Usage: ``python official.py PAIRS.json OUT.json`` where PAIRS.json is a list of
``{"name", "pred", "ref"}`` (BraTS 2023 labels 1/2/3). Each pair is scored by
``brats_evaluation.evaluation.evaluate_single_exam`` with the bundled glioma config, exactly as
``brats-evaluation --config gli`` does; OUT.json keeps the raw Panoptica figures per region.
This file imports nothing from fedseg: it runs where fedseg is not installed.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from importlib.resources import files
from typing import Any

from brats_evaluation.evaluation import evaluate_single_exam
from panoptica import Panoptica_Evaluator

KEYS = ("global_bin_dsc", "global_bin_hd95", "sq_dsc", "sq_hd95", "tp", "fp", "fn")


def main() -> None:
    pairs_path, out_path = sys.argv[1], sys.argv[2]
    with open(pairs_path) as f:
        pairs = json.load(f)
    config = files("brats_evaluation").joinpath("configs", "config_gli.yaml")
    evaluator = Panoptica_Evaluator.load_from_config(str(config))
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    out = {
        "brats-evaluation": version("BraTS_evaluation"),
        "panoptica": version("panoptica"),
        "config": "config_gli.yaml",
        "cases": cases,
    }
    for pair in pairs:
        res = evaluate_single_exam(pair["pred"], pair["ref"], pair["name"], evaluator)
        if "error" in res:
            raise SystemExit(f"{pair['name']}: the evaluator failed: {res['error']}")
        cases[pair["name"]] = {
            region: {k: res[region][k] for k in KEYS} for region in ("wt", "tc", "et")
        }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
