"""Sample-level differential privacy at a site: DP-SGD with Opacus, and its RDP accountant.

What is private
    One *training case* of one site (sample-level DP). Every local step clips each case's
    gradient to ``dp-clip-norm`` (L2 over all parameters), sums, adds Gaussian noise of standard
    deviation ``sigma * dp-clip-norm`` and divides by the expected batch size (Opacus's
    :class:`~opacus.optimizers.DPOptimizer`). Augmentation is applied per case before the
    forward pass, so it is part of the (randomised) per-case computation.
What the accountant assumes, and how the data loading matches it
    Opacus's RDP accountant assumes Poisson subsampling: each step includes every case
    independently with probability ``q = 1 / steps-per-epoch``. Training therefore draws its
    batches with Opacus's :class:`~opacus.data_loader.DPDataLoader` (variable batch sizes, empty
    batches possible), seeded like the non-private loader, so the accounting is for the sampling
    that really happened.
Where the noise comes from
    ``dp-noise-multiplier``, or, when ``dp-target-epsilon > 0``, the smallest multiplier that
    keeps the whole run (``num-server-rounds * local-epochs * steps-per-epoch`` steps at rate
    ``q``) within the target at ``dp-delta`` (Opacus's ``get_noise_multiplier``).
Per-sample gradients
    :data:`GRAD_SAMPLE_MODES`: Opacus's ``"hooks"``, ``"functorch"`` and ``"ghost"`` (fast gradient
    clipping: a norm pass, then a second backward of the re-weighted per-sample loss), and
    ``"per-sample-backward"``: Opacus's ``"no_op"`` module with per-case gradients computed by one
    backward pass per case through the batched forward graph (instance norm has no
    cross-sample coupling, so these are exact). ``benchmarks/bench_dp.py`` measures them;
    :data:`DEFAULT_GRAD_SAMPLE_MODE` is the fastest on the default 3D U-Net (see BENCHMARKS.md).
What is trained
    ``dp-trainable``: every parameter (``all``), or only a small subset while the rest stays
    exactly at the received global values: the normalisation layers' affine parameters
    (``norm``), or those and every bias (``norm-bias``). The noise is added to every trained
    coordinate, so its norm grows with the square root of their number (~3·10^5 for the default
    U-Net, ~600 for ``norm``); fine-tuning a model pretrained on public data (``init-model``)
    through such a subset is the usual remedy when a site has few cases (DP-BiTFiT, Bu et al.
    2022; De et al. 2022; Tramèr & Boneh 2021). The accounting does not depend on it.
The loss
    DP needs one loss per case, so DP training uses :class:`PerSampleDiceCELoss` (Dice and BCE per
    case, averaged over the batch) instead of the batch-pooled Dice of
    :func:`fedseg.model.losses.build_loss`.

The trainer calls :meth:`SitePrivacy.attach` before its loop and :meth:`SitePrivacy.detach` after
it; between the two, ``trainer.model`` is Opacus's wrapper, outside them the plain U-Net, so
weights always leave the site with their plain (non-``_module.``) names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.errors import ConfigError, PrivacyBudgetError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from fedseg.config import FedsegConfig

#: Per-sample gradient engines (see the module docstring).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("per-sample-backward", "functorch", "ghost", "hooks")
#: The engine used by the site trainer (fastest on the default 3D U-Net, BENCHMARKS.md).
DEFAULT_GRAD_SAMPLE_MODE = "per-sample-backward"
#: A finite stand-in for an infinite clip bound (Opacus computes ``sigma * C`` for the noise).
_NO_CLIP = 1e30

#: One accountant entry: ``(noise multiplier, sample rate, steps)``, as Opacus's RDP history.
AccountantEntry = tuple[float, float, int]


# --------------------------------------------------------------------------------------------
# accounting (pure)


def epsilon_spent(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` of a sequence of subsampled Gaussian mechanisms (Opacus RDP).

    Parameters
    ----------
    history:
        ``(noise multiplier, sample rate, steps)`` entries, composed in order.
    delta:
        Target delta.

    Returns
    -------
    float
        Epsilon, never negative; ``0.0`` for an empty history, ``inf`` when a step had no noise.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    entries = normalise_history(history)
    if not entries:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in entries):
        return math.inf
    # What RDPAccountant.get_privacy_spent computes, with the per-step RDP of each distinct
    # (sigma, q) computed once: RDP composes additively, so k steps cost k times one step.
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(steps * _rdp_one_step(sigma, q) for sigma, q, steps in entries)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    # Opacus's conversion goes below zero for a large delta and little privacy loss; an
    # epsilon is never negative (a negative one would lower a sum of runs' epsilons)
    return max(float(eps), 0.0)


def rdp_curve(history: Iterable[Sequence[float]]) -> np.ndarray:
    """The Renyi DP of a sequence of subsampled Gaussian mechanisms, one value per order.

    Parameters
    ----------
    history:
        ``(noise multiplier, sample rate, steps)`` entries.

    Returns
    -------
    numpy.ndarray
        RDP at each of Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (zeros for an empty history,
        ``inf`` everywhere when a step had no noise). Curves of mechanisms run on the same
        data add up (RDP composition); :func:`epsilon_of_rdp` converts one to epsilon.
    """
    from opacus.accountants import RDPAccountant

    entries = normalise_history(history)
    orders = RDPAccountant.DEFAULT_ALPHAS
    if any(sigma <= 0 for sigma, _, _ in entries):
        return np.full(len(orders), math.inf)
    out = np.zeros(len(orders))
    for sigma, q, steps in entries:
        out = out + steps * _rdp_one_step(sigma, q)
    return out


def epsilon_of_rdp(rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve from :func:`rdp_curve` (Opacus's conversion).

    Returns
    -------
    float
        ``0.0`` for an all-zero curve, ``inf`` when it holds an infinite or NaN value.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    values = np.asarray(rdp, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return math.inf
    if not np.any(values):
        return 0.0
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=values, delta=delta)
    return max(float(eps), 0.0)  # never negative (see epsilon_spent)


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sigma: float, q: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    out: np.ndarray = compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    out.flags.writeable = False
    return out


def normalise_history(history: Iterable[Sequence[float]]) -> list[AccountantEntry]:
    """Entries as ``(float, float, int)`` tuples, steps > 0 only (from arrays, lists, ...)."""
    out: list[AccountantEntry] = []
    for row in history:
        sigma, q, steps = float(row[0]), float(row[1]), int(round(float(row[2])))
        if steps > 0:
            out.append((sigma, q, steps))
    return out


def history_to_array(history: Iterable[Sequence[float]]) -> np.ndarray:
    """The accountant history as a ``(k, 3)`` float64 array (for site state files)."""
    rows = normalise_history(history)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 3)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``target_epsilon`` at ``delta`` over ``steps`` steps.

    Uses :func:`opacus.accountants.utils.get_noise_multiplier` (RDP accountant). A site asks
    again at the start of every round and the search takes seconds, so the results are
    memoised per process (a pure function of the arguments).

    Raises
    ------
    ConfigError
        A non-positive target or step count, or a sample rate outside ``(0, 1]``.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ConfigError(f"dp-target-epsilon must be a finite number > 0, got {target_epsilon}")
    if steps <= 0 or not 0 < sample_rate <= 1:
        raise ConfigError(f"cannot calibrate noise for {steps} steps at sample rate {sample_rate}")
    return _calibrate_cached(float(target_epsilon), float(delta), float(sample_rate), int(steps))


@functools.lru_cache(maxsize=256)
def _calibrate_cached(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )


def site_sample_rate(num_cases: int, batch_size: int) -> float:
    """Poisson sampling rate ``1 / ceil(num_cases / batch_size)`` (Opacus's DPDataLoader)."""
    if num_cases <= 0 or batch_size <= 0:
        raise ConfigError(f"no DP sampling for {num_cases} case(s) in batches of {batch_size}")
    return 1.0 / math.ceil(num_cases / batch_size)


def resolve_noise_multiplier(cfg: FedsegConfig, num_cases: int) -> float:
    """``dp-noise-multiplier``, or the value calibrated from ``dp-target-epsilon`` for the run.

    The run is ``num-server-rounds * local-epochs`` epochs of ``ceil(num_cases / batch-size)``
    steps at rate :func:`site_sample_rate` (a site sampled in every round: the worst case).
    """
    if cfg.dp_target_epsilon > 0:
        steps_per_epoch = math.ceil(num_cases / cfg.batch_size)
        steps = cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch
        q = site_sample_rate(num_cases, cfg.batch_size)
        return calibrate_noise(cfg.dp_target_epsilon, cfg.dp_delta, q, steps)
    return float(cfg.dp_noise_multiplier)


def check_budget(epsilon_after: float, budget: float) -> None:
    """Refuse a round that would take a site past its epsilon budget (``0``: no budget).

    Raises
    ------
    PrivacyBudgetError
        ``epsilon_after > budget`` (also for an infinite epsilon, i.e. no noise).
    """
    if budget > 0 and not epsilon_after <= budget:
        raise PrivacyBudgetError(
            f"this round would spend epsilon {epsilon_after:.3f} in total, past the budget "
            f"{budget:g} (dp-epsilon-budget)"
        )


# --------------------------------------------------------------------------------------------
# the per-sample loss and model validation


def build_per_sample_loss() -> torch.nn.Module:
    """A :class:`PerSampleDiceCELoss` (``reduction="mean"``)."""
    return PerSampleDiceCELoss()


def _per_sample_loss_class() -> type[torch.nn.Module]:
    import torch
    from monai.losses import DiceLoss

    class _PerSampleDiceCELoss(torch.nn.Module):
        """Soft Dice + BCE with logits, one value per case (``reduction`` none/mean/sum).

        The same terms as :func:`fedseg.model.losses.build_loss` (sigmoid, squared
        prediction, smoothing 1e-5), but the Dice is computed per case and region
        (``batch=False``) so that each case's loss depends on that case only, as DP-SGD's
        per-sample clipping and Opacus's ``DPLossFastGradientClipping`` require.
        """

        def __init__(self, reduction: str = "mean") -> None:
            super().__init__()
            self.reduction = reduction
            self.dice = DiceLoss(
                sigmoid=True,
                smooth_nr=1e-5,
                smooth_dr=1e-5,
                squared_pred=True,
                batch=False,
                reduction="none",
            )

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            dice: torch.Tensor = self.dice(logits, target).flatten(1).mean(1)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, target.to(logits.dtype), reduction="none"
            )
            per_case = dice + bce.flatten(1).mean(1)
            if self.reduction == "none":
                return per_case
            if self.reduction == "sum":
                return per_case.sum()
            return per_case.mean()

    return _PerSampleDiceCELoss


_LOSS_CLASS: type[torch.nn.Module] | None = None


def PerSampleDiceCELoss(reduction: str = "mean") -> torch.nn.Module:  # noqa: N802 - a class factory
    """Build the per-case Dice + BCE loss (see ``_PerSampleDiceCELoss``; torch imported lazily)."""
    global _LOSS_CLASS
    if _LOSS_CLASS is None:
        _LOSS_CLASS = _per_sample_loss_class()
    return _LOSS_CLASS(reduction)


def validate_model(model: torch.nn.Module) -> None:
    """Check that Opacus can train ``model`` privately (:class:`opacus.validators.ModuleValidator`).

    Raises
    ------
    ConfigError
        The model holds modules DP-SGD cannot handle (BatchNorm, ...), listed in the message.
    """
    from opacus.validators import ModuleValidator

    training = model.training
    model.train()  # Opacus checks train mode too; the module kinds are what matter here
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(training)
    if errors:
        listed = "; ".join(str(e) for e in errors[:3])
        raise ConfigError(f"the model cannot be trained with DP-SGD: {listed}")


# --------------------------------------------------------------------------------------------
# what DP-SGD trains (``dp-trainable``)


def _check_trainable(trainable: str) -> None:
    from fedseg.config import DP_TRAINABLE

    if trainable not in DP_TRAINABLE:
        raise ConfigError.for_key(
            "dp-trainable", f"expected one of {', '.join(DP_TRAINABLE)}, found {trainable!r}"
        )


def trainable_names(model: torch.nn.Module, trainable: str) -> list[str]:
    """Names of the parameters DP-SGD trains under ``dp-trainable = trainable``.

    ``all``: every parameter; ``norm``: the affine parameters of the normalisation layers
    (instance, batch, group, layer norm); ``norm-bias``: those and every parameter named
    ``bias``.

    Raises
    ------
    ConfigError
        An unknown ``trainable`` (with the allowed values), or a choice that selects nothing.
    """
    import torch

    _check_trainable(trainable)
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        return names
    norms = (
        torch.nn.modules.batchnorm._NormBase,  # batch and instance norm
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
    )
    keep: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, norms):
            keep.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    if trainable == "norm-bias":
        keep.update(n for n in names if n.rsplit(".", 1)[-1] == "bias")
    chosen = [n for n in names if n in keep]
    if not chosen:
        raise ConfigError.for_key("dp-trainable", f"{trainable!r} selects no parameter here")
    return chosen


def noise_generator(model: torch.nn.Module, seed: int | None = None) -> torch.Generator:
    """A ``torch.Generator`` on the device of ``model``'s parameters, for DP-SGD's noise.

    Parameters
    ----------
    model:
        The model DP-SGD trains (its first parameter's device is used; the CPU without any).
    seed:
        Seeds the generator when given (the same seed draws the same noise on one device).

    Returns
    -------
    torch.Generator
        A generator whose ``device`` is the parameters' device.
    """
    import torch

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    return gen


# --------------------------------------------------------------------------------------------
# per-sample-backward: per-case gradients by one backward per case


class _PerSampleBackwardLoss:
    """A loss that, on ``backward()``, stores each case's gradient in ``p.grad_sample``.

    It behaves like Opacus's ``DPTensorFastGradientClipping``: ``+ extra`` adds a
    data-independent term (FedProx) to every case's loss, ``detach()`` gives the batch mean.
    """

    def __init__(self, per_case: torch.Tensor, params: list[torch.Tensor]) -> None:
        self.per_case = per_case
        self.params = params
        self.extra: torch.Tensor | None = None

    def __add__(self, other: Any) -> _PerSampleBackwardLoss:
        out = _PerSampleBackwardLoss(self.per_case, self.params)
        out.extra = other if self.extra is None else self.extra + other
        return out

    __radd__ = __add__

    def detach(self) -> torch.Tensor:
        value = self.per_case.detach().mean() if self.per_case.numel() else self.per_case.sum()
        return value + (self.extra.detach() if self.extra is not None else 0.0)

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        import torch

        n = int(self.per_case.shape[0])
        grads: list[list[torch.Tensor]] = [[] for _ in self.params]
        for i in range(n):
            loss_i = self.per_case[i] if self.extra is None else self.per_case[i] + self.extra
            got = torch.autograd.grad(
                loss_i, self.params, retain_graph=i < n - 1, allow_unused=True
            )
            for slot, g, p in zip(grads, got, self.params, strict=True):
                slot.append(torch.zeros_like(p) if g is None else g)
        for p, slot in zip(self.params, grads, strict=True):
            # Opacus reads each parameter's per-sample gradients from this attribute
            p.grad_sample = (  # type: ignore[attr-defined]
                torch.stack(slot)
                if slot
                else torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            )


class _PerSampleBackwardCriterion:
    def __init__(self, criterion: torch.nn.Module, params: list[torch.Tensor]) -> None:
        self.criterion = criterion
        self.params = params

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> _PerSampleBackwardLoss:
        old = self.criterion.reduction
        self.criterion.reduction = "none"  # type: ignore[assignment]  # a loss's plain str
        try:
            per_case = self.criterion(logits, target)
        finally:
            self.criterion.reduction = old
        return _PerSampleBackwardLoss(per_case, self.params)


class SkipEmptyBatches:
    """Iterate a Poisson loader; take an empty batch's DP-SGD step here and skip it.

    With Poisson sampling a batch may hold no case. DP-SGD still takes that step (the
    accountant counts it): the clipped sum is zero, so the update is noise only. The U-Net
    cannot run on an empty batch (instance norm), so the step is taken here, with zero
    gradients, and the trainer only sees the non-empty batches.

    The empty step changes the model and the optimizer, so it must run on the thread that
    trains: a trainer that reads batches ahead on another thread reads :attr:`loader` there
    and passes what it read through :meth:`consume` on its own thread.
    """

    def __init__(self, loader: Any, optimizer: Any, module: Any, *, ghost: bool) -> None:
        self.loader = loader
        self.optimizer = optimizer
        self.module = module
        self.ghost = ghost

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return self.consume(self.loader)

    def consume(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The non-empty batches of ``batches`` (read from :attr:`loader`); an empty one is
        stepped here, on the calling thread."""
        for batch in batches:
            if isinstance(batch, dict) and int(batch["image"].shape[0]) > 0:
                yield batch
            else:
                self._empty_step()

    def _empty_step(self) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            if self.ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()


# --------------------------------------------------------------------------------------------
# the site's DP-SGD engine


class SitePrivacy:
    """DP-SGD for one site's :class:`~fedseg.site.trainer.SiteTrainer`, with its accountant.

    Parameters
    ----------
    noise_multiplier:
        ``sigma``; the noise has standard deviation ``sigma * clip_norm``.
    clip_norm:
        Per-case L2 clip bound (``inf``: no clipping, only with ``sigma = 0``).
    delta:
        The delta at which epsilon is reported.
    history:
        The accountant's history so far (restored from the site state).
    grad_sample_mode:
        One of :data:`GRAD_SAMPLE_MODES`.
    poisson_sampling:
        Draw batches by Poisson sampling (what the accountant assumes). ``False`` only for
        tests that compare with non-private training batch for batch.
    trainable:
        ``dp-trainable`` (:func:`trainable_names`): the other parameters are frozen between
        :meth:`attach` and :meth:`detach` and keep their values exactly.

    Raises
    ------
    ConfigError
        Unknown mode or ``trainable``, negative noise, or noise with an infinite clip bound.
    """

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        delta: float,
        *,
        history: Iterable[Sequence[float]] = (),
        grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
        poisson_sampling: bool = True,
        trainable: str = "all",
    ) -> None:
        _check_trainable(trainable)
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
            )
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ConfigError(f"dp-noise-multiplier must be >= 0, got {noise_multiplier}")
        if math.isinf(clip_norm) and noise_multiplier > 0:
            raise ConfigError("dp-clip-norm inf (no clipping) cannot be combined with noise")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.history: list[AccountantEntry] = normalise_history(history)
        self.grad_sample_mode = grad_sample_mode
        self.poisson_sampling = poisson_sampling
        self.trainable = trainable
        self._engine: Any = None
        self._attached: tuple[Any, Any, Any] | None = None
        self._frozen: list[Any] = []

    # ---------------------------------------------------------------- accounting
    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` spent so far (all rounds, including restored ones)."""
        return epsilon_spent(self._current_history(), self.delta)

    def projected_epsilon(self, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at ``sample_rate`` with this noise."""
        entry = (self.noise_multiplier, sample_rate, steps)
        return epsilon_spent([*self._current_history(), entry], self.delta)

    def _current_history(self) -> list[AccountantEntry]:
        if self._engine is not None:
            return normalise_history(self._engine.accountant.history)
        return list(self.history)

    # ---------------------------------------------------------------- training
    def attach(
        self, trainer: Any, loader: DataLoader[Any], *, seed: int | None = None
    ) -> DataLoader[Any]:
        """Make ``trainer``'s model, optimizer and loss private for one ``train`` call.

        Returns the DP data loader (Poisson sampling) to iterate instead of ``loader``.
        """
        from opacus import PrivacyEngine

        self.detach(trainer)  # a previous call that raised may have left the wrappers on
        trainer.model.train()  # Opacus refuses a module in eval mode
        # Frozen before make_private, so that Opacus computes, clips and noises the trained
        # parameters only; without a gradient AdamW leaves the frozen ones untouched.
        keep = set(trainable_names(trainer.model, self.trainable))
        for name, p in trainer.model.named_parameters():
            if name not in keep and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                self._frozen.append(p)
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = list(self.history)
        # Opacus draws the noise on the parameters' device with this generator: a CPU
        # generator fails on a CUDA model ("Expected a 'cuda' device type for generator").
        gen = noise_generator(trainer.model, None if seed is None else seed + 1)
        clip = _NO_CLIP if math.isinf(self.clip_norm) else self.clip_norm
        criterion = build_per_sample_loss()
        mode = "no_op" if self.grad_sample_mode == "per-sample-backward" else self.grad_sample_mode
        out = engine.make_private(
            module=trainer.model,
            optimizer=trainer.optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=self.poisson_sampling,
            noise_generator=gen,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            module, optimizer, dp_loss, dp_loader = out
        else:
            module, optimizer, dp_loader = out
            params = [p for p in module.parameters() if p.requires_grad]
            if mode == "no_op":
                dp_loss = _PerSampleBackwardCriterion(criterion, params)
            else:
                dp_loss = criterion
        # Opacus describes an empty *first* Poisson batch from ``dataset[0]``, which fails on
        # dict samples (it iterates the keys); without that description it yields ``[]``,
        # which SkipEmptyBatches turns into the noise-only step.
        collate = getattr(dp_loader, "collate_fn", None)
        if collate is not None and hasattr(collate, "sample_empty_shapes"):
            collate.sample_empty_shapes = None
        self._attached = (trainer.model, trainer.optimizer, trainer.loss_fn)
        self._engine = engine
        trainer.model, trainer.optimizer, trainer.loss_fn = module, optimizer, dp_loss
        # iterated like the DataLoader it wraps (all the trainer does with it)
        skip = SkipEmptyBatches(dp_loader, optimizer, trainer.model, ghost=mode == "ghost")
        return skip  # type: ignore[return-value]

    def detach(self, trainer: Any) -> None:
        """Undo :meth:`attach`: plain model, optimizer and loss back, parameters unfrozen;
        keep the accountant."""
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        if self._attached is None:
            return
        wrapped = trainer.model
        trainer.model, trainer.optimizer, trainer.loss_fn = self._attached
        self._attached = None
        if hasattr(wrapped, "_close"):
            wrapped._close()
        for p in trainer.model.parameters():
            for attr in ("grad_sample", "_norm_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
        if self._engine is not None:
            self.history = normalise_history(self._engine.accountant.history)
            self._engine = None


def check_privacy_unit(num_samples: int, num_cases: int) -> None:
    """Refuse DP-SGD whose Poisson-sampled unit is not one training case.

    The accountant's figure is for one *sample* of the training loader: Opacus clips each
    sample's gradient and samples each with rate ``1 / ceil(samples / batch)``. Sample-level DP
    promises one training *case*, so the loader must hold exactly one sample per case. A 2D
    model (``spatial-dims = 2``) trains on every slice of every case instead: each case is then
    dozens of samples, the calibration (made for the cases) does not match the steps that run,
    and the epsilon reported would be a per-slice figure, far below the per-case one.

    Parameters
    ----------
    num_samples:
        Samples of the training loader (``len(trainer.dataset)``).
    num_cases:
        Training cases of the site.

    Raises
    ------
    ConfigError
        ``num_samples != num_cases``.
    """
    if num_samples != num_cases:
        raise ConfigError(
            f"dp-mode 'sample': DP-SGD accounts for one training case per sample, but the "
            f"training loader holds {num_samples} samples for {num_cases} case(s) (2D slices: "
            f"spatial-dims 2); use spatial-dims 3 or dp-mode 'client'"
        )


def enable_site_privacy(
    trainer: Any, cfg: FedsegConfig, history: Iterable[Sequence[float]] = ()
) -> SitePrivacy:
    """Give ``trainer`` a :class:`SitePrivacy` from the config (``dp-mode sample``).

    The noise multiplier is :func:`resolve_noise_multiplier` for the trainer's training cases;
    ``history`` is the accountant's history restored from the site state; ``dp-trainable``
    chooses the parameters DP-SGD trains (:func:`trainable_names`).

    Raises
    ------
    ConfigError
        The model fails Opacus's validation, the training loader's samples are not the cases
        (:func:`check_privacy_unit`), or the DP settings are invalid.
    """
    # a trainer without a loader dataset (a stand-in) samples its cases
    check_privacy_unit(
        len(getattr(trainer, "dataset", trainer.train_items)), len(trainer.train_items)
    )
    validate_model(trainer.model)
    sigma = resolve_noise_multiplier(cfg, len(trainer.train_items))
    privacy = SitePrivacy(
        sigma, cfg.dp_clip_norm, cfg.dp_delta, history=history, trainable=cfg.dp_trainable
    )
    trainer.privacy = privacy
    return privacy


def round_steps(num_cases: int, batch_size: int, epochs: int) -> int:
    """DP-SGD steps in one call of ``epochs`` epochs (Opacus: ``ceil(n / batch)`` per epoch)."""
    return epochs * math.ceil(num_cases / batch_size)


#: The key of the accountant's history in the site state (``{"history": (k, 3) array}``).
DP_STATE = "dp-accountant"


def start_private_round(
    trainer: Any, cfg: FedsegConfig, saved: dict[str, np.ndarray] | None, epochs: int
) -> SitePrivacy:
    """Before a federated round with ``dp-mode sample``: restore the accountant, check the budget.

    Parameters
    ----------
    trainer:
        The site's :class:`~fedseg.site.trainer.SiteTrainer`; gets a :class:`SitePrivacy`.
    cfg:
        ``dp-*`` keys, ``batch-size``.
    saved:
        The site state's :data:`DP_STATE` entry (``None`` before the site's first DP round).
    epochs:
        Local epochs of this round.

    Raises
    ------
    PrivacyBudgetError
        The round would take the site past ``dp-epsilon-budget``; nothing is trained.
    """
    history = saved.get("history", np.zeros((0, 3))) if saved else np.zeros((0, 3))
    privacy = enable_site_privacy(trainer, cfg, history=np.asarray(history).reshape(-1, 3))
    n = len(trainer.train_items)
    steps = round_steps(n, cfg.batch_size, epochs)
    after = privacy.projected_epsilon(site_sample_rate(n, cfg.batch_size), steps)
    check_budget(after, cfg.dp_epsilon_budget)
    return privacy


def finish_private_round(privacy: SitePrivacy) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """After the round: the reply's DP metrics and the site state to keep.

    Returns
    -------
    tuple
        ``({"dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-steps"}, {"history": array})``;
        ``dp-epsilon`` is the total spent so far (``inf`` without noise).
    """
    history = history_to_array(privacy.history)
    metrics = {
        "dp-epsilon": privacy.epsilon(),
        "dp-delta": privacy.delta,
        "dp-noise-multiplier": privacy.noise_multiplier,
        "dp-steps": float(history[:, 2].sum()) if len(history) else 0.0,
    }
    return metrics, {"history": history}
