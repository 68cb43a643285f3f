"""A site's lifetime privacy ledger: the epsilon every run has cost this hospital, in total.

The run's own accountant (:mod:`fedseg.privacy.dpsgd`) and the server's ledger
(:mod:`fedseg.privacy.ledger`) count one run, against a budget the run config sets. This
ledger belongs to the site: a JSON file in its state folder (``privacy-ledger.json`` in the
node config's ``state-dir``, else beside the policy file), written atomically under a file
lock, so that it survives restarts and reinstalls of fedseg. ``fedseg site-ledger`` shows it.

What it stores is mechanisms, not epsilons: for each Flower run (key ``run-<run id>``, given by
the SuperLink, not by the run config) the DP-SGD steps the site really took, as
``(noise multiplier, sample rate, steps)`` rows, and the plan of the whole run computed from its
config before the first round (:func:`planned_entry`). Epsilon is computed from them at the
policy's delta when needed (Opacus RDP, :func:`fedseg.privacy.dpsgd.epsilon_spent`):

* a run costs ``max(planned, spent)``: its planned epsilon is reserved as soon as it is
  admitted (a run stopped early keeps its reservation), and rounds beyond the plan (a server
  that sends more rounds or epochs than its config said) are counted as spent;
* the lifetime total is the sum of the runs' costs (basic composition over runs);
* a training round is admitted only if, with it, the run's cost stays within
  ``max-epsilon-per-run`` and the total within ``max-epsilon-lifetime``
  (:meth:`LifetimeLedger.admit_training`); otherwise the refusal, with its reason, is added to
  the ledger and nothing is trained.

A resumed run is a new Flower run and is charged again: conservative, never less than spent.
Runs without sample-level DP (accepted by a policy that allows them) are listed without an
epsilon.

Statistics a site releases outside training and without DP noise (continual learning's Fisher,
histogram standardisation's landmarks, the fusion model's feature moments and rounds) are
booked under ``releases``: one row per run and kind, with what was released, how many times,
first and last (:meth:`LifetimeLedger.record_release`); a policy that requires DP refuses them
before they are computed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.errors import ConfigError, SitePolicyError

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig
    from fedseg.site.policy import SitePolicy

__all__ = [
    "LEDGER_FILE",
    "LEDGER_FORMAT",
    "LifetimeLedger",
    "RunCost",
    "Mechanism",
    "planned_entry",
    "round_entry",
]

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = "fedseg-privacy-ledger-v1"

#: one DP-SGD mechanism: ``(noise multiplier, sample rate, steps)``
Mechanism = tuple[float, float, int]

#: tolerance of the epsilon comparisons (a run calibrated to exactly the limit is accepted)
_TOLERANCE = 1e-9


def planned_entry(cfg: FedsegConfig, num_train_cases: int) -> Mechanism:
    """The DP-SGD mechanism of a whole run as its config plans it, before any training.

    ``num-server-rounds * local-epochs * ceil(n / batch-size)`` steps at rate
    ``1 / ceil(n / batch-size)`` with the noise multiplier the site will use
    (:func:`fedseg.privacy.dpsgd.resolve_noise_multiplier`: calibrated from
    ``dp-target-epsilon`` when set). ``n`` is the number of training cases, known from the
    listing of the site's folder (no image is read).
    """
    from fedseg.privacy.dpsgd import resolve_noise_multiplier, round_steps, site_sample_rate

    sigma = resolve_noise_multiplier(cfg, num_train_cases)
    q = site_sample_rate(num_train_cases, cfg.batch_size)
    steps = cfg.num_server_rounds * round_steps(num_train_cases, cfg.batch_size, cfg.local_epochs)
    return (float(sigma), float(q), int(steps))


def round_entry(cfg: FedsegConfig, num_train_cases: int, epochs: int) -> Mechanism:
    """The DP-SGD mechanism of one round of ``epochs`` local epochs (the message's)."""
    from fedseg.privacy.dpsgd import resolve_noise_multiplier, round_steps, site_sample_rate

    sigma = resolve_noise_multiplier(cfg, num_train_cases)
    q = site_sample_rate(num_train_cases, cfg.batch_size)
    return (float(sigma), float(q), round_steps(num_train_cases, cfg.batch_size, epochs))


@dataclass(frozen=True)
class RunCost:
    """One run's epsilons at a delta: ``planned``, ``spent`` and ``charged = max`` of both."""

    planned: float
    spent: float

    @property
    def charged(self) -> float:
        """What the run counts for in the lifetime total."""
        return max(self.planned, self.spent)


def _epsilon(entries: Sequence[Sequence[float]], delta: float) -> float:
    from fedseg.privacy.dpsgd import epsilon_spent

    return epsilon_spent(entries, delta) if entries else 0.0


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class LifetimeLedger:
    """The ledger file of one site (see the module docstring).

    Parameters
    ----------
    path:
        The JSON file (need not exist yet).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = self._read()

    # ------------------------------------------------------------------------- reading
    @staticmethod
    def empty() -> dict[str, Any]:
        """The contents of a new ledger."""
        return {
            "format": LEDGER_FORMAT,
            "policy": None,
            "delta": None,
            "runs": {},
            "refusals": [],
            "releases": [],
        }

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return self.empty()
        where = f"site ledger {self.path}"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: cannot be read as JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"{where}: key 'format': expected {LEDGER_FORMAT!r}, found {found!r}")
        runs = data.get("runs")
        if not isinstance(runs, dict):
            raise ConfigError(f"{where}: key 'runs': expected an object, found {runs!r}")
        for key, run in runs.items():
            if not isinstance(run, dict):
                raise ConfigError(f"{where}: runs.{key}: expected an object")
            for part in ("planned", "rounds"):
                rows = run.get(part) or []
                rows = [rows] if part == "planned" and rows else rows
                if not isinstance(rows, list) or not all(_is_mechanism(r) for r in rows):
                    raise ConfigError(
                        f"{where}: runs.{key}.{part}: expected (noise multiplier, sample rate, "
                        f"steps) rows, found {run.get(part)!r}"
                    )
        for key in ("refusals", "releases"):
            if not isinstance(data.get(key, []), list):
                raise ConfigError(f"{where}: key '{key}': expected a list")
            data.setdefault(key, [])
        return data

    def run_cost(self, run_key: str, delta: float) -> RunCost:
        """The epsilons of one run at ``delta`` (zero for a run without sample-level DP)."""
        run = self.data["runs"].get(run_key) or {}
        planned = run.get("planned")
        rounds = [row[1:] for row in run.get("rounds") or []]
        return RunCost(
            planned=_epsilon([planned], delta) if planned else 0.0,
            spent=_epsilon(rounds, delta),
        )

    def total(self, delta: float, *, exclude: str | None = None) -> float:
        """The lifetime epsilon at ``delta``: the sum of every run's charged epsilon."""
        return sum(self.run_cost(key, delta).charged for key in self.data["runs"] if key != exclude)

    def trained_in(self, run_key: str) -> bool:
        """Whether this site was admitted to train in run ``run_key``."""
        return bool((self.data["runs"].get(run_key) or {}).get("rounds-trained"))

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """A JSON-ready view: per run its epsilons (at ``delta``, default the policy's), the
        total, and the refusals."""
        d = delta if delta is not None else self.data.get("delta")
        runs = {}
        for key, run in self.data["runs"].items():
            row: dict[str, Any] = {
                "dp-mode": run.get("dp-mode"),
                "first-seen": run.get("first-seen"),
                "last-seen": run.get("last-seen"),
                "rounds-trained": list(run.get("rounds-trained") or []),
            }
            if d is not None and run.get("dp-mode") == "sample":
                cost = self.run_cost(key, float(d))
                row |= {"planned": cost.planned, "spent": cost.spent, "charged": cost.charged}
            runs[key] = row
        total = self.total(float(d)) if d is not None else None
        return {
            "ledger": str(self.path),
            "policy": self.data.get("policy"),
            "delta": d,
            "lifetime-budget": self.data.get("lifetime-budget"),
            "total-epsilon": total,
            "runs": runs,
            "refusals": list(self.data.get("refusals") or []),
            "releases": list(self.data.get("releases") or []),
        }

    # ------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the ledger's lock and re-read it (another process may have written it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()
            yield

    def _save(self) -> None:
        from fedseg.utils.io import atomic_write_json

        atomic_write_json(self.path, self.data)

    def record_refusal(self, run_key: str, reason: str) -> None:
        """Add a refusal (its time, the run, the reason) to the ledger."""
        with self._locked():
            self._add_refusal(run_key, reason)
            self._save()

    def record_release(self, run_key: str, kind: str, what: str) -> None:
        """Book a statistic released without DP in run ``run_key``: one row per run and kind
        (``what`` it is), its count and first and last time updated on each release."""
        with self._locked():
            now = _now()
            rows = self.data["releases"]
            row = next((r for r in rows if r.get("run") == run_key and r.get("kind") == kind), None)
            if row is None:
                rows.append(
                    {
                        "run": run_key,
                        "kind": kind,
                        "what": what,
                        "count": 1,
                        "first": now,
                        "last": now,
                    }
                )
            else:
                row["count"] = int(row.get("count", 0)) + 1
                row["last"] = now
            self._save()

    def _add_refusal(self, run_key: str, reason: str) -> None:
        self.data["refusals"].append({"time": _now(), "run": run_key, "reason": reason})

    def admit_training(
        self,
        policy: SitePolicy,
        run_key: str,
        server_round: int,
        dp_mode: str,
        planned: Mechanism | None,
        this_round: Mechanism | None,
    ) -> RunCost:
        """Admit one training round of run ``run_key`` and book it, or refuse it.

        Parameters
        ----------
        policy:
            The site's policy (limits and delta).
        run_key:
            The run (``run-<Flower run id>``).
        server_round:
            The round, for the record.
        dp_mode:
            The run's ``dp-mode``; only ``sample`` has an epsilon here.
        planned:
            With ``sample``: the whole run's mechanism (:func:`planned_entry`).
        this_round:
            With ``sample``: this round's mechanism (:func:`round_entry`).

        Returns
        -------
        RunCost
            The run's epsilons with this round booked.

        Raises
        ------
        SitePolicyError
            The round would take the run past ``max-epsilon-per-run`` or the site past
            ``max-epsilon-lifetime``; the refusal is in the ledger, nothing is booked.
        """
        delta = policy.delta
        with self._locked():
            self.data["policy"] = policy.name
            self.data["delta"] = delta
            self.data["lifetime-budget"] = policy.max_epsilon_lifetime
            run = self.data["runs"].get(run_key) or {
                "dp-mode": dp_mode,
                "first-seen": _now(),
                "planned": None,
                "rounds": [],
                "rounds-trained": [],
            }
            cost = RunCost(0.0, 0.0)
            if dp_mode == "sample" and planned is not None and this_round is not None:
                old = run.get("planned")
                plans = [p for p in (old, list(planned)) if p]
                # the larger plan is kept: a config that changes between messages never
                # lowers what the run has reserved
                best = max(plans, key=lambda p: _epsilon([p], delta))
                rounds = [row[1:] for row in run.get("rounds") or []] + [list(this_round)]
                cost = RunCost(_epsilon([best], delta), _epsilon(rounds, delta))
                others = self.total(delta, exclude=run_key)
                problems = []
                if cost.charged > policy.max_epsilon_per_run * (1 + _TOLERANCE):
                    problems.append(
                        f"a run of epsilon {_fmt(cost.charged)} at delta {delta:g} "
                        f"(requires at most {policy.max_epsilon_per_run:g} per run)"
                    )
                if others + cost.charged > policy.max_epsilon_lifetime * (1 + _TOLERANCE):
                    problems.append(
                        f"a run of epsilon {_fmt(cost.charged)} at delta {delta:g} on top of "
                        f"the {_fmt(others)} already spent (requires at most "
                        f"{policy.max_epsilon_lifetime:g} in this site's lifetime)"
                    )
                if problems:
                    reason = f"policy '{policy.name}' refuses {'; '.join(problems)}"
                    self._add_refusal(run_key, reason)
                    self._save()
                    raise SitePolicyError(reason, public_reason=reason)
                run["planned"] = best
                run["rounds"] = [*(run.get("rounds") or []), [int(server_round), *this_round]]
            run["last-seen"] = _now()
            run["rounds-trained"] = [*(run.get("rounds-trained") or []), int(server_round)]
            self.data["runs"][run_key] = run
            self._save()
        return cost


def _is_mechanism(row: Any) -> bool:
    if not isinstance(row, list) or len(row) not in (3, 4):
        return False
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)


def _fmt(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:.3f}"
