"""Training the segmentation model a fusion study takes its predicted regions from.

Study-level code (it runs a federation with :func:`fedseg.experiment.engine.run_federation`),
kept apart from :mod:`fedseg.fusion.segment`, which the sites import to predict regions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.errors import CheckpointError, ModelCardError

if TYPE_CHECKING:
    from fedseg.federation.loop import HistoryRow


def segmentation_config(
    seed: int, test_fraction: float, rounds: int, overrides: Mapping[str, Any] | None = None
) -> Any:
    """The configuration of the segmentation federation a fusion study trains.

    The ``cpu-demo`` network and FedAvg, ``rounds`` rounds of two local epochs (the default
    study's budget) at FedAvg's own learning rate in that study (``arm-learning-rates``), the
    study's ``seed`` and ``test-fraction`` (each site scores the model on that share of the
    cases it is given, which are training cases of the fusion study), then ``overrides``
    (kebab-case keys).

    Raises
    ------
    ConfigError
        A bad override.
    """
    from fedseg.config import FedsegConfig, parse_arm_learning_rates

    default = FedsegConfig()
    rate = parse_arm_learning_rates(default.arm_learning_rates).get("fedavg")
    base = {
        "strategy": "fedavg",
        "learning-rate": default.learning_rate if rate is None else rate,
        "num-server-rounds": rounds,
        "local-epochs": 2,
        "seed": seed,
        "test-fraction": test_fraction,
        "val-fraction": 0.0,
    }
    return FedsegConfig.from_run_config({**base, **dict(overrides or {})})


def train_segmentation(
    data: Path,
    sites: Mapping[str, list[str]],
    out: Path,
    cfg: Any,
    say: Callable[[str], None] = lambda s: None,
) -> Path:
    """Train the segmentation model with FedAvg over the sites, or reuse the one in ``out``.

    Parameters
    ----------
    data:
        The cohort folder.
    sites:
        Site name to case ids: only cases the fusion study trains on (each site trains on the
        ``split_cases`` training part of these and scores the model on the rest).
    out:
        The run folder (``final_model.pt`` and its card, ``history.json``); a finished run of
        the same config and sites is reused, an interrupted one resumed.
    cfg:
        From :func:`segmentation_config`.
    say:
        Receives one-line progress messages.

    Returns
    -------
    pathlib.Path
        The model file (``out/final_model.pt``, with its card).
    """
    from fedseg.clinic.card import read_card
    from fedseg.data.partition import read_partition
    from fedseg.experiment.engine import PARTITION_CSV, run_federation

    model = Path(out) / "final_model.pt"
    if model.is_file() and (Path(out) / PARTITION_CSV).is_file():
        try:
            card = read_card(model)
        except (ModelCardError, CheckpointError):
            card = {}
        same_sites = {s: sorted(v) for s, v in read_partition(Path(out) / PARTITION_CSV).items()}
        mine = {k: v for k, v in cfg.to_run_config().items() if k not in _RUN_KEYS}
        theirs = {k: v for k, v in dict(card.get("config", {})).items() if k not in _RUN_KEYS}
        if mine == theirs and same_sites == {s: sorted(v) for s, v in sites.items()}:
            say(f"reusing the segmentation model {model}")
            return model

    def progress(rnd: int, total: int, row: HistoryRow) -> None:
        dice = row.get("mean-dice") or {}
        shown = [f"{r} {v:.3f}" for r, v in dice.items() if isinstance(v, float)]
        tail = f", test Dice {' '.join(shown)}" if shown else ""
        say(f"segmentation round {rnd}/{total}{tail}")

    say(
        f"training the segmentation model: FedAvg, {cfg.num_server_rounds} rounds over "
        f"{len(sites)} sites' training cases"
    )
    run_federation(cfg, Path(data), sites, Path(out), engine="inprocess", progress=progress)
    return model


# keys a federation's runner sets per run folder: not part of what decides the model
_RUN_KEYS = ("data-path", "partition-file", "out-dir", "num-sites", "cache-dir")
