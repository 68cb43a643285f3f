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
* the lifetime total is the sum of the runs' costs (basic composition over runs), or, when
  larger, the epsilon at the policy's delta of all runs composed in RDP (each run's curve the
  larger of its plan's and its rounds'). A plain sum of k runs' epsilons would hold at
  ``k * delta`` only; the larger of the two holds at ``delta`` itself, which is what the
  ledger states;
* a training round is admitted only if, with it, the run's cost stays within
  ``max-epsilon-per-run`` and the total within ``max-epsilon-lifetime``
  (:meth:`LifetimeLedger.admit_training`); otherwise the refusal, with its reason, is added to
  the ledger and nothing is trained.

A resumed run is a new Flower run and is charged again: conservative, never less than spent.
A damaged ledger (not JSON, a row that is not a finite mechanism) is refused with the file and
the field named, and never written over: the site then refuses to train until it is repaired.
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.errors import ConfigError, SitePolicyError

if TYPE_CHECKING:
    from fedseg.config import FedsegConfig
    from fedseg.site.policy import SitePolicy

__all__ = [
    "ACCOUNTANT",
    "LEDGER_FILE",
    "LEDGER_FORMAT",
    "LifetimeLedger",
    "Mechanism",
    "RunCost",
    "lifetime_epsilon",
    "planned_entry",
    "round_entry",
]

LEDGER_FILE = "privacy-ledger.json"
#: how the ledger counts epsilon (stated in :meth:`LifetimeLedger.summary` and the CLI)
ACCOUNTANT = (
    "Opacus RDP accountant, sample-level DP-SGD (one training case); runs composed by the "
    "larger of the sum of their epsilons and their RDP composition"
)
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


def _run_mechanisms(run: Any) -> tuple[list[Sequence[float]], list[Sequence[float]]]:
    """A ledger run's planned mechanism (zero or one row) and its rounds' mechanisms."""
    run = run if isinstance(run, dict) else {}
    planned = run.get("planned")
    return ([planned] if planned else []), [row[1:] for row in run.get("rounds") or []]


def _run_cost(run: Any, delta: float) -> RunCost:
    planned, rounds = _run_mechanisms(run)
    return RunCost(planned=_epsilon(planned, delta), spent=_epsilon(rounds, delta))


def lifetime_epsilon(runs: Iterable[Any], delta: float) -> float:
    """The lifetime epsilon at ``delta`` of ledger runs (see the module docstring).

    Parameters
    ----------
    runs:
        The runs' ledger entries (``planned`` and ``rounds`` rows).
    delta:
        The delta at which the total must hold.

    Returns
    -------
    float
        ``max(sum of the runs' charged epsilons, epsilon of their RDP composition)``; ``inf``
        when a run had no noise.
    """
    import numpy as np

    from fedseg.privacy.dpsgd import epsilon_of_rdp, rdp_curve

    basic = 0.0
    composed: Any = 0.0
    for run in runs:
        planned, rounds = _run_mechanisms(run)
        if not planned and not rounds:
            continue
        basic += _run_cost(run, delta).charged
        composed = composed + np.maximum(rdp_curve(planned), rdp_curve(rounds))
    if isinstance(composed, float):
        return basic
    return max(basic, epsilon_of_rdp(composed, delta))


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
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{where}: cannot be read as JSON ({exc}); it is left as it is: restore it "
                "from a backup (the site refuses to train until then)"
            ) from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"{where}: key 'format': expected {LEDGER_FORMAT!r}, found {found!r}")
        _check_ledger(data, where)
        for key in ("refusals", "releases"):
            data.setdefault(key, [])
        return data

    def run_cost(self, run_key: str, delta: float) -> RunCost:
        """The epsilons of one run at ``delta`` (zero for a run without sample-level DP)."""
        return _run_cost(self.data["runs"].get(run_key), delta)

    def total(self, delta: float, *, exclude: str | None = None) -> float:
        """The lifetime epsilon at ``delta`` (:func:`lifetime_epsilon` of every run but
        ``exclude``)."""
        return lifetime_epsilon(
            (run for key, run in self.data["runs"].items() if key != exclude), delta
        )

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
            "policy-delta": self.data.get("delta"),
            "accountant": ACCOUNTANT,
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

    def record_refusal(
        self,
        run_key: str,
        reason: str,
        server_round: int | None = None,
        request: str = "train",
    ) -> None:
        """Add a refusal (its time, the run, the round when known, the request refused:
        ``train``, ``evaluate``, ``fisher``, ``landmarks`` or ``fusion``, and the reason)."""
        with self._locked():
            self._add_refusal(run_key, reason, server_round, request)
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

    def _add_refusal(
        self,
        run_key: str,
        reason: str,
        server_round: int | None = None,
        request: str = "train",
    ) -> None:
        row: dict[str, Any] = {"time": _now(), "run": run_key, "request": request}
        if server_round is not None:
            row["round"] = int(server_round)
        self.data["refusals"].append({**row, "reason": reason})

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
            if dp_mode == "sample" or run.get("planned") or run.get("rounds"):
                if planned is None or this_round is None or dp_mode != "sample":
                    # never book a round of a DP run without its epsilon
                    raise ConfigError(
                        f"site ledger {self.path}: {run_key} round {server_round}: dp-mode "
                        f"{dp_mode!r} without its DP-SGD mechanism cannot be booked"
                    )
                bad = [
                    f"{what} (noise multiplier {m[0]!r}, sample rate {m[1]!r}, steps {m[2]!r})"
                    for what, m in (("plan", planned), ("round", this_round))
                    if not _is_mechanism(_as_floats(m))
                ]
                if bad:
                    # e.g. a message asking for negative local epochs: refused, never booked
                    # (a row the ledger cannot read back would stop the site)
                    reason = (
                        f"policy '{policy.name}' refuses a DP-SGD {' and '.join(bad)} that is "
                        "not a valid mechanism (requires noise multiplier >= 0, sample rate in "
                        "(0, 1], whole steps >= 0)"
                    )
                    self._add_refusal(run_key, reason, server_round)
                    self._save()
                    raise SitePolicyError(reason, public_reason=reason)
                old = run.get("planned")
                plans = [p for p in (old, [float(v) for v in planned]) if p]
                # the larger plan is kept: a config that changes between messages never
                # lowers what the run has reserved
                best = max(plans, key=lambda p: _epsilon([p], delta))
                row = [int(server_round), *(float(v) for v in this_round[:2]), int(this_round[2])]
                candidate = {**run, "planned": best, "rounds": [*(run.get("rounds") or []), row]}
                cost = _run_cost(candidate, delta)
                others = self.total(delta, exclude=run_key)
                after = lifetime_epsilon(
                    [*(r for k, r in self.data["runs"].items() if k != run_key), candidate], delta
                )
                problems = []
                # written as "not <=" so that a NaN (a damaged figure) refuses too
                if not cost.charged <= policy.max_epsilon_per_run * (1 + _TOLERANCE):
                    problems.append(
                        f"a run of epsilon {_fmt(cost.charged)} at delta {delta:g} "
                        f"(requires at most {policy.max_epsilon_per_run:g} per run)"
                    )
                if not after <= policy.max_epsilon_lifetime * (1 + _TOLERANCE):
                    problems.append(
                        f"a run of epsilon {_fmt(cost.charged)} at delta {delta:g} on top of "
                        f"the {_fmt(others)} already spent, {_fmt(after)} in all (requires at "
                        f"most {policy.max_epsilon_lifetime:g} in this site's lifetime)"
                    )
                if problems:
                    reason = f"policy '{policy.name}' refuses {'; '.join(problems)}"
                    self._add_refusal(run_key, reason, server_round)
                    self._save()
                    raise SitePolicyError(reason, public_reason=reason)
                run = candidate
            run["last-seen"] = _now()
            run["rounds-trained"] = [*(run.get("rounds-trained") or []), int(server_round)]
            self.data["runs"][run_key] = run
            self._save()
        return cost


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _as_floats(row: Any) -> list[float] | None:
    """``row`` as a list of floats (numpy scalars included); ``None`` when it is not one."""
    try:
        return [float(v) for v in row]
    except (TypeError, ValueError):
        return None


def _is_mechanism(row: Any) -> bool:
    """``[noise multiplier >= 0, sample rate in (0, 1], whole steps >= 0]``, all finite."""
    if not isinstance(row, list) or len(row) != 3 or not all(_is_number(v) for v in row):
        return False
    sigma, q, steps = row
    return sigma >= 0 and 0 < q <= 1 and steps >= 0 and float(steps).is_integer()


def _is_round(row: Any) -> bool:
    """``[server round, noise multiplier, sample rate, steps]`` (see :func:`_is_mechanism`)."""
    return (
        isinstance(row, list)
        and len(row) == 4
        and _is_number(row[0])
        and float(row[0]).is_integer()
        and _is_mechanism(row[1:])
    )


def _check_ledger(data: dict[str, Any], where: str) -> None:
    """Refuse a ledger whose content is not what :class:`LifetimeLedger` writes.

    Raises
    ------
    ConfigError
        Naming the file (``where``), the field, what was expected and what was found.
    """

    def bad(field: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"{where}: {field}: expected {expected}, found {found!r}")

    runs = data.get("runs")
    if not isinstance(runs, dict):
        raise ConfigError(f"{where}: key 'runs': expected an object, found {runs!r}")
    delta = data.get("delta")
    if delta is not None and not (_is_number(delta) and 0 < delta < 1):
        raise bad("key 'delta'", "a number in (0, 1) or null", delta)
    budget = data.get("lifetime-budget")
    if budget is not None and not (_is_number(budget) and budget > 0):
        raise bad("key 'lifetime-budget'", "a number > 0 or null", budget)
    if data.get("policy") is not None and not isinstance(data.get("policy"), str):
        raise bad("key 'policy'", "a policy name or null", data.get("policy"))
    for key, run in runs.items():
        if not isinstance(run, dict):
            raise bad(f"runs.{key}", "an object", run)
        planned = run.get("planned")
        if planned is not None and not _is_mechanism(planned):
            raise bad(
                f"runs.{key}.planned", "(noise multiplier, sample rate, steps) or null", planned
            )
        rounds = run.get("rounds") or []
        if not isinstance(rounds, list) or not all(_is_round(r) for r in rounds):
            raise bad(
                f"runs.{key}.rounds",
                "(round, noise multiplier, sample rate, steps) rows",
                run.get("rounds"),
            )
        trained = run.get("rounds-trained") or []
        if not isinstance(trained, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in trained
        ):
            raise bad(f"runs.{key}.rounds-trained", "a list of rounds", run.get("rounds-trained"))
        if run.get("dp-mode") is not None and not isinstance(run.get("dp-mode"), str):
            raise bad(f"runs.{key}.dp-mode", "a dp-mode", run.get("dp-mode"))
    for key, fields in (("refusals", ("run", "reason")), ("releases", ("run", "kind"))):
        rows = data.get(key, [])
        if not isinstance(rows, list):
            raise bad(f"key '{key}'", "a list", rows)
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
                raise bad(f"{key}[{i}]", f"an object with {' and '.join(fields)}", row)


def _fmt(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:.3f}"
