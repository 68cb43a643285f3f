"""Experiments: arms run by one runner, federations run by one engine function.

An experiment (``fedseg study``, ``privacy-sweep``, ``robustness``) declares its arms
(:class:`~fedseg.experiment.arms.Arm`: a name plus config overrides, optionally a seed and a
phase) and a function that runs one arm; :func:`~fedseg.experiment.runner.run_experiment`
runs them with one resume rule and writes one result file per arm
(:mod:`fedseg.experiment.results`: schema and fingerprint). A federated arm calls
:func:`~fedseg.experiment.engine.run_federation` with the engine of the experiment
(``simulation``, ``inprocess`` or ``superlink``); :mod:`fedseg.experiment.meter` counts its
time and the bytes that cross the grid. Adding an experiment means declaring its arms and
writing its report section.

Modules: ``arms``, ``results``, ``runner``, ``engine`` (imports Flower), ``meter`` (imports
Flower).
"""

from fedseg.experiment.arms import Arm, check_arms
from fedseg.experiment.results import fingerprint, read_result, write_result
from fedseg.experiment.runner import ArmSkipped, arm_folder, run_experiment

__all__ = [
    "Arm",
    "ArmSkipped",
    "arm_folder",
    "check_arms",
    "fingerprint",
    "read_result",
    "run_experiment",
    "write_result",
]
