"""A hospital's own privacy policy: what a run must promise before this site takes part.

Every privacy setting of a run (``dp-mode``, the noise or target epsilon, ``secure-aggregation``,
the strategy) is chosen by whoever submits the run. The site policy is the hospital's answer:
a small TOML file in the site's own configuration (SuperNode node config ``policy-file``),
read at every message, which the server can neither see nor change. A request that asks for
less than the policy is refused *before any data is touched*, with a reply that names the
policy, what was asked and what is required (:class:`fedseg.errors.SitePolicyError`, code
``E700``). Where the policy asks for more than the run (DP on a run without it), the site
refuses: it never changes the arithmetic of a shared run on its own.

The file (every key but ``name`` may be left out; a missing key takes the strict default of
:func:`default_policy`)::

    name = "hospital-a-2027"                 # shown in every refusal
    dp-modes = ["sample"]                    # accepted dp-mode values (none, sample, client)
    max-epsilon-per-run = 8.0                # largest epsilon of one run (dp-mode sample)
    max-epsilon-lifetime = 24.0              # largest epsilon of all runs together
    delta = 1e-5                             # the delta at which this site counts epsilon (<= 0.01)
    secure-aggregation = ["secagg+", "ckks"] # accepted secure-aggregation values
    strategies = ["fedavg", "fedprox", ...]  # accepted strategy values
    aggregators = ["mean", "median", ...]    # accepted aggregator values
    evaluate-only = false                    # score models of runs this site did not train in
    max-model-parameters = 50000000          # largest model (parameter count) accepted

Epsilon is sample-level epsilon (DP-SGD at this site, ``dp-mode = "sample"``), computed by the
site itself from the noise, sampling rate and steps it really uses, at the policy's ``delta``;
the lifetime sum is kept by :mod:`fedseg.site.lifetime`. ``client`` (server-side noise) cannot
be checked by a site: accept it only if the server is trusted. This module is pure: parsing,
validation and the request check, no Flower, no I/O besides reading the file.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedseg.config import AGGREGATORS, DP_MODES, SECURE_MODES, STRATEGIES
from fedseg.errors import ConfigError, SitePolicyError, did_you_mean

__all__ = [
    "MAX_DELTA",
    "POLICY_KEYS",
    "PolicyRequest",
    "SitePolicy",
    "check_request",
    "default_policy",
    "load_policy",
    "policy_from_dict",
    "policy_to_toml",
]

#: the largest ``delta`` a policy may state: a larger one is no meaningful DP guarantee (each
#: case may leak with that probability), and usually a slip of units (a percentage, say)
MAX_DELTA = 1e-2

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")


@dataclass(frozen=True)
class SitePolicy:
    """A validated site policy (see the module docstring for the file's keys).

    Attributes
    ----------
    name:
        The policy's name, quoted in every refusal.
    dp_modes:
        Accepted ``dp-mode`` values.
    max_epsilon_per_run:
        Largest sample-level epsilon of one run at :attr:`delta`.
    max_epsilon_lifetime:
        Largest sum of the epsilons of every run this site took part in.
    delta:
        The delta at which the site computes epsilon.
    secure_aggregation:
        Accepted ``secure-aggregation`` values (``"none"`` among them: plain updates accepted).
    strategies:
        Accepted ``strategy`` values.
    aggregators:
        Accepted ``aggregator`` values.
    evaluate_only:
        Whether the site scores models of runs it has not trained in.
    max_model_parameters:
        Largest number of model parameters (array elements) the site accepts to receive.
    """

    name: str
    dp_modes: tuple[str, ...] = ("sample",)
    max_epsilon_per_run: float = 8.0
    max_epsilon_lifetime: float = 24.0
    delta: float = 1e-5
    secure_aggregation: tuple[str, ...] = ("secagg+", "ckks")
    strategies: tuple[str, ...] = STRATEGIES
    aggregators: tuple[str, ...] = AGGREGATORS
    evaluate_only: bool = False
    max_model_parameters: int = 50_000_000
    #: where it was read from (for messages at the site only; never sent)
    source: str = field(default="policy", compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def requires_dp(self) -> bool:
        """Whether every accepted ``dp-mode`` is a DP mode (``none`` not accepted)."""
        return "none" not in self.dp_modes


#: the TOML keys of a policy file, in the order :func:`policy_to_toml` writes them
POLICY_KEYS: tuple[str, ...] = tuple(
    f.name.replace("_", "-") for f in fields(SitePolicy) if f.name != "source"
)

_CHOICES: dict[str, tuple[str, ...]] = {
    "dp_modes": DP_MODES,
    "secure_aggregation": SECURE_MODES,
    "strategies": STRATEGIES,
    "aggregators": AGGREGATORS,
}


def permissive_policy(name: str = "open") -> SitePolicy:
    """A policy that accepts every run: every DP mode (``none`` included), any epsilon, plain
    or secure aggregation, evaluation-only requests and any model size. For drills and
    benchmarks about something other than privacy; never what a hospital should run with."""
    return SitePolicy(
        name,
        dp_modes=tuple(DP_MODES),
        max_epsilon_per_run=1e9,
        max_epsilon_lifetime=1e9,
        secure_aggregation=tuple(SECURE_MODES),
        evaluate_only=True,
        max_model_parameters=10**12,
    )


def default_policy(name: str) -> SitePolicy:
    """The strict policy ``fedseg provision`` writes: DP-SGD at epsilon <= 8 per run and 24 in
    total (delta 1e-5), secure aggregation required, no evaluation-only runs, models up to
    5e7 parameters, every strategy and aggregation rule."""
    return SitePolicy(name=name)


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _validate(p: SitePolicy) -> None:
    where = p.source
    if not isinstance(p.name, str) or not _NAME.match(p.name):
        raise ConfigError(
            f"{where}: key 'name': expected 1-64 letters, digits or '_.@+-' (starting with a "
            f"letter or digit), found {p.name!r}"
        )
    for attr, allowed in _CHOICES.items():
        values = getattr(p, attr)
        if not isinstance(values, tuple) or not values:
            raise ConfigError(
                f"{where}: key '{_key(attr)}': expected a non-empty list of "
                f"{', '.join(allowed)}, found {values!r}"
            )
        for v in values:
            if v not in allowed:
                hint = did_you_mean(str(v), allowed)
                raise ConfigError(
                    f"{where}: key '{_key(attr)}': {v!r} is not one of {', '.join(allowed)}{hint}"
                )
    for attr in ("max_epsilon_per_run", "max_epsilon_lifetime"):
        value = getattr(p, attr)
        if not _is_number(value) or not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"{where}: key '{_key(attr)}': expected a finite number > 0, found {value!r}"
            )
    if p.max_epsilon_per_run > p.max_epsilon_lifetime:
        raise ConfigError(
            f"{where}: key 'max-epsilon-per-run' ({p.max_epsilon_per_run:g}) is larger than "
            f"'max-epsilon-lifetime' ({p.max_epsilon_lifetime:g})"
        )
    if not _is_number(p.delta) or not 0 < p.delta <= MAX_DELTA:
        raise ConfigError(
            f"{where}: key 'delta': expected a probability in (0, {MAX_DELTA:g}] (DP needs it far "
            f"below 1 / the number of cases, e.g. 1e-5), found {p.delta!r}"
        )
    if not isinstance(p.evaluate_only, bool):
        raise ConfigError(
            f"{where}: key 'evaluate-only': expected true or false, found {p.evaluate_only!r}"
        )
    n = p.max_model_parameters
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(
            f"{where}: key 'max-model-parameters': expected an integer > 0, found {n!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def policy_from_dict(doc: Mapping[str, Any], *, source: str = "policy") -> SitePolicy:
    """Build a :class:`SitePolicy` from a parsed policy file.

    Parameters
    ----------
    doc:
        The TOML document (kebab-case keys, see the module docstring).
    source:
        The file name, for error messages.

    Returns
    -------
    SitePolicy

    Raises
    ------
    ConfigError
        An unknown key (with the closest known one), a missing ``name``, or a bad value; the
        message names ``source`` and the key.
    """
    for key in doc:
        if key not in POLICY_KEYS:
            hint = did_you_mean(str(key), POLICY_KEYS)
            raise ConfigError(
                f"{source}: unknown key {key!r} (allowed: {', '.join(POLICY_KEYS)}){hint}"
            )
    if "name" not in doc:
        raise ConfigError(f"{source}: missing key 'name' (the policy's name, shown in refusals)")
    values: dict[str, Any] = {"source": source}
    for key, raw in doc.items():
        attr = key.replace("-", "_")
        if attr in _CHOICES:
            if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                raise ConfigError(
                    f"{source}: key '{key}': expected a list of strings "
                    f"({', '.join(_CHOICES[attr])}), found {raw!r}"
                )
            raw = tuple(dict.fromkeys(raw))
        elif attr in ("max_epsilon_per_run", "max_epsilon_lifetime", "delta") and (
            isinstance(raw, int) and not isinstance(raw, bool)
        ):
            raw = float(raw)
        values[attr] = raw
    return SitePolicy(**values)


def load_policy(path: Path | str) -> SitePolicy:
    """Read and validate a site policy file (TOML).

    Raises
    ------
    ConfigError
        The file is missing, not UTF-8 TOML, or holds a bad key or value (the message names
        the file and the key).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"site policy file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"site policy file {path}: cannot be read ({exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"site policy file {path}: not valid TOML ({exc})") from None
    return policy_from_dict(doc, source=f"site policy file {path}")


def policy_to_toml(policy: SitePolicy) -> str:
    """The policy as a commented TOML file that :func:`load_policy` reads back unchanged."""

    def lst(values: Sequence[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    p = policy
    return f"""# fedseg site privacy policy: what a run must promise before this hospital joins it.
# Read by this site at every message (node config key policy-file); the server cannot change
# it. A request asking for less is refused before any data is read, and the refusal (policy
# name, what was asked, what is required) is sent to the server. See docs/deployment.md.
name = "{p.name}"

# Accepted dp-mode values: "sample" (DP-SGD here, checked by this site), "client" (noise added
# by the server: accept only if you trust it), "none" (no differential privacy).
dp-modes = {lst(p.dp_modes)}
# Sample-level epsilon at this delta, computed here from the run's noise, sampling and steps:
# the largest of one run, and the largest of all runs together (lifetime ledger, see
# fedseg site-ledger). A run that would pass either is refused.
max-epsilon-per-run = {p.max_epsilon_per_run!r}
max-epsilon-lifetime = {p.max_epsilon_lifetime!r}
delta = {p.delta!r}

# Accepted secure-aggregation values ("none": the server may see this site's update).
secure-aggregation = {lst(p.secure_aggregation)}
# Accepted strategy and aggregator values.
strategies = {lst(p.strategies)}
aggregators = {lst(p.aggregators)}
# Score models of runs this site has not trained in (evaluation-only requests).
evaluate-only = {"true" if p.evaluate_only else "false"}
# Largest model this site accepts to receive and train (number of parameters).
max-model-parameters = {p.max_model_parameters}
"""


@dataclass(frozen=True)
class PolicyRequest:
    """What one message asks of a site, as far as its policy is concerned.

    Attributes
    ----------
    kind:
        ``"train"``, ``"evaluate"``, ``"fisher"`` (continual learning's Fisher query),
        ``"landmarks"`` (histogram standardisation's landmark query) or ``"fusion"`` (the
        fusion model's feature moments and training rounds).
    dp_mode, secure_aggregation, strategy, aggregator:
        The run's values of these keys (the strategy the message names).
    model_parameters:
        Number of array elements of the model the message carries.
    trained_in_run:
        For an evaluation: whether this site has trained in the same run.
    """

    kind: str
    dp_mode: str
    secure_aggregation: str
    strategy: str
    aggregator: str
    model_parameters: int
    trained_in_run: bool = False


def check_request(policy: SitePolicy, request: PolicyRequest) -> None:
    """Refuse a request that asks for less than ``policy`` (epsilon is checked separately).

    Every rule is checked and all that fail are named in one refusal.

    Raises
    ------
    SitePolicyError
        Naming the policy, each value the request asked and what the policy requires.
    """
    p, r = policy, request
    problems: list[str] = []

    def one_of(key: str, asked: str, accepted: tuple[str, ...]) -> None:
        if asked not in accepted:
            problems.append(f"{key} {asked!r} (requires one of: {', '.join(accepted)})")

    if r.kind == "evaluate" and not r.trained_in_run and not p.evaluate_only:
        problems.append(
            "an evaluation-only request (requires: this site trained in the run; "
            "evaluate-only = false)"
        )
    if r.kind == "fisher" and p.requires_dp:
        problems.append(
            "the Fisher information of the site's loss, which is not differentially private "
            "(requires: dp-modes accepting 'none')"
        )
    if r.kind == "landmarks" and p.requires_dp:
        problems.append(
            "the histogram landmarks of the site's training cases, which are not differentially "
            "private (requires: dp-modes accepting 'none')"
        )
    if r.kind == "fusion" and p.requires_dp:
        problems.append(
            "the fusion model of images and clinical records and its feature moments, which are "
            "not differentially private (requires: dp-modes accepting 'none')"
        )
    if r.kind == "train":
        one_of("dp-mode", r.dp_mode, p.dp_modes)
        one_of("secure-aggregation", r.secure_aggregation, p.secure_aggregation)
        one_of("aggregator", r.aggregator, p.aggregators)
    one_of("strategy", r.strategy, p.strategies)
    if r.model_parameters > p.max_model_parameters:
        problems.append(
            f"a model of {r.model_parameters} parameters "
            f"(requires at most {p.max_model_parameters})"
        )
    if problems:
        reason = f"policy '{p.name}' refuses {'; '.join(problems)}"
        raise SitePolicyError(reason, public_reason=reason)
