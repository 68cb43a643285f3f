"""The one config source of fedseg.

Values come from the Flower app config (``[tool.flwr.app.config]`` in pyproject.toml, kebab-case
keys, overridable with ``flwr run --run-config``) or from CLI options, and are parsed once into
the frozen, validated :class:`FedsegConfig`. A bad key or value raises
:class:`fedseg.errors.ConfigError` naming the key, what is allowed and the closest match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedseg.errors import ConfigError, did_you_mean

#: federated strategies the ServerApp knows (``strategy`` key)
STRATEGIES: tuple[str, ...] = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "scaffold",
    "fedbn",
    "cyclic",
)

#: server-side aggregation rules (``aggregator`` key); ``mean`` is the strategy's own average
AGGREGATORS: tuple[str, ...] = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")

#: simulated attacks of a malicious site (``attack`` key)
ATTACKS: tuple[str, ...] = (
    "none",
    "sign-flip",
    "noise",
    "scale",
    "lie",
    "free-rider",
    "nan",
    "label-flip",
    "backdoor",
    "inflate",
)

#: the count attack, alone (``inflate``) or after any other attack (``scale+inflate``, ...)
INFLATE = "inflate"

#: differential-privacy modes (``dp-mode`` key)
DP_MODES: tuple[str, ...] = ("none", "sample", "client")

#: what DP-SGD trains at a site (``dp-trainable`` key, ``dp-mode sample``): every parameter, the
#: normalisation layers' affine parameters, or those and every bias (the rest stays frozen)
DP_TRAINABLE: tuple[str, ...] = ("all", "norm", "norm-bias")

#: mixed precision of training and inference (``amp`` key): none, or bfloat16 autocast on CUDA
AMP_MODES: tuple[str, ...] = ("none", "bf16")
#: ``data-on-device``: where the training patches are cut (see :mod:`fedseg.data.patches`)
DATA_ON_DEVICE: tuple[str, ...] = ("auto", "off", "on")

#: named sets of values (``preset`` key, ``--preset``), applied under the keys that are given.
#: ``cpu-demo`` is the dataclass defaults (a whole study on a 2-core laptop, ``make demo``);
#: ``cpu-native`` is the native-resolution path on a CPU: cases on a 2 mm grid cropped to the
#: brain, 64^3 patches (a third centred on tumour), sliding-window inference, the cpu-demo
#: network and ``basic`` augmentation (better enhancing-tumour outlines, about 2.5 times
#: cpu-demo's time);
#: ``gpu`` trains at BraTS's native 1 mm on 128^3 patches (a third centred on tumour) with a
#: U-Net of nnU-Net's size class (32..320 channels, 5 levels, about 13 M parameters), bf16
#: autocast, nnU-Net's augmentation set run on the GPU and 8 DataLoader workers.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": {},
    # augment "basic": what its 60-epoch `fedseg train` figures were measured with (not chosen
    # again when cpu-demo's default became "none")
    "cpu-native": {"spacing": 2.0, "patch-size": 64, "augment": "basic"},
    "gpu": {
        "spacing": 1.0,
        "image-size": 128,
        "patch-size": 128,
        "base-channels": 32,
        "depth": 5,
        "max-channels": 320,
        "amp": "bf16",
        "num-workers": 8,
        "augment": "nnunet",
        "device-augment": True,
        # the per-arm rates and augmentation of the cpu-demo default were chosen for its model
        # and budget
        "arm-learning-rates": "",
        "arm-augment": "",
    },
}

#: the preset ``fedseg train`` uses when none is named (``--preset``, ``--set preset=``) and the
#: model is 3D: its model is the one evaluated, deployed and served, and on 2 mm patches it keeps
#: tumour core and enhancing tumour within 0.10 of its in-distribution Dice on another
#: generator's cases, which the 48^3 grid of ``cpu-demo`` does not (BENCHMARKS "Cases of an
#: independently modelled generator"); a study's arms keep the ``preset`` key's default
TRAIN_PRESET = "cpu-native"

#: the arms ``arm-learning-rates`` may name: the study's baselines and every strategy
LR_ARMS: tuple[str, ...] = ("centralized", "local", *STRATEGIES)
#: ``fedseg study``: the keys an arm may have its own value of, each with the key that gives it
#: (an explicit ``--set`` of the key, or ``--tune`` of it, empties the per-arm key)
PER_ARM_KEYS: dict[str, str] = {"learning-rate": "arm-learning-rates", "augment": "arm-augment"}


def _parse_arm_items(
    text: str, key: str, form: str, example: str, parse_value: Callable[[str, str], Any]
) -> dict[str, Any]:
    """``"ARM=VALUE, ..."`` -> ``{arm: parse_value(arm, raw)}`` for the per-arm keys (``form``:
    how an item reads in the error, e.g. ``ARM=RATE``)."""
    out: dict[str, Any] = {}
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        arm, sep, raw = (x.strip() for x in item.partition("="))
        if not sep or not arm:
            raise ConfigError(
                f"'{key}': expected {form} items separated by commas (e.g. {example}), "
                f"found {item!r}"
            )
        if arm not in LR_ARMS:
            raise ConfigError(f"'{key}': unknown arm {arm!r}; expected one of {', '.join(LR_ARMS)}")
        if arm in out:
            raise ConfigError(f"'{key}': {arm} is given twice")
        out[arm] = parse_value(arm, raw)
    return out


def parse_arm_learning_rates(text: str) -> dict[str, float]:
    """``"fedavg=0.012, fedprox=0.008"`` -> ``{"fedavg": 0.012, "fedprox": 0.008}``.

    Raises
    ------
    ConfigError
        An item that is not ``ARM=RATE``, an unknown arm (naming the allowed ones), an arm
        given twice, or a rate that is not a finite number > 0; the message names
        ``arm-learning-rates``.
    """

    def rate(arm: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"'arm-learning-rates': {arm}: expected a learning rate > 0, found {raw!r}"
            )
        return value

    return _parse_arm_items(
        text, "arm-learning-rates", "ARM=RATE", "fedavg=0.012,fedprox=0.008", rate
    )


def parse_arm_augment(text: str) -> dict[str, str]:
    """``"local=basic"`` -> ``{"local": "basic"}`` (each value in :func:`parse_augment`'s form).

    Groups of one arm are joined by ``+`` (``"local=spatial+intensity"``), since commas separate
    the arms.

    Raises
    ------
    ConfigError
        An item that is not ``ARM=AUGMENT``, an unknown arm, an arm given twice, or a value
        :func:`parse_augment` refuses; the message names ``arm-augment``.
    """

    def augment(arm: str, raw: str) -> str:
        try:
            return parse_augment(raw.replace("+", ","))
        except ConfigError as err:
            raise ConfigError(f"'arm-augment': {arm}: {err}") from None

    return _parse_arm_items(text, "arm-augment", "ARM=AUGMENT", "local=basic", augment)


#: what FedBN normalises with at a hospital it has no parameters for (``unseen-norm`` key)
UNSEEN_NORMS: tuple[str, ...] = ("average", "adapt")
#: intensity harmonisation before training and evaluation (``harmonise`` key): none, or Nyúl
#: histogram standardisation with landmarks averaged across the sites
#: (:mod:`fedseg.data.harmonise`)
HARMONISE_METHODS: tuple[str, ...] = ("none", "histogram")
#: training augmentation (``augment`` key): a named set, or a comma-separated list of groups.
#: ``basic`` is the light set fedseg used before (flips, a small affine, intensity scale and
#: shift); ``nnunet`` is nnU-Net's default set; ``all`` adds elastic deformation, a bias field
#: and the tumour compartments' contrast. ``basic`` also combines with ``tumour-contrast`` and
#: ``bias-field`` (``basic,bias-field,tumour-contrast``). The transforms of each group:
#: :mod:`fedseg.data.augment`.
AUGMENT_SETS: tuple[str, ...] = ("none", "basic", "nnunet", "all")
AUGMENT_GROUPS: tuple[str, ...] = (
    "spatial",
    "elastic",
    "intensity",
    "bias-field",
    "noise",
    "resolution",
    "mirror",
    "tumour-contrast",
)
#: the groups ``basic`` (a set, not a group) can be listed with
_WITH_BASIC: tuple[str, ...] = ("bias-field", "tumour-contrast")
#: the groups of nnU-Net's default set (its trainers leave elastic deformation off, p = 0, and
#: have no bias field)
NNUNET_GROUPS: tuple[str, ...] = ("spatial", "intensity", "noise", "resolution", "mirror")
#: the values the ``augment`` key took when it was a boolean, and what they mean now
_AUGMENT_BOOLS: dict[str, str] = {
    "true": "basic",
    "1": "basic",
    "yes": "basic",
    "false": "none",
    "0": "none",
    "no": "none",
}
#: what a federation trains (``task`` key): the segmentation network or the fusion model
TASKS: tuple[str, ...] = ("segmentation", "fusion")
#: the fusion model's endpoints (``fusion-endpoint``): WHO grade 4 vs 2-3, overall survival
FUSION_ENDPOINTS: tuple[str, ...] = ("grade", "survival")
#: its feature sets (``fusion-features``)
FUSION_FEATURE_SETS: tuple[str, ...] = ("image", "clinical", "fusion")
#: where its image features' tumour regions come from (``fusion-image-source``): a
#: segmentation model's prediction, or the reference label maps (an upper bound)
FUSION_IMAGE_SOURCES: tuple[str, ...] = ("predicted", "reference")
#: drift correction of federated fusion training (``fusion-correction``): each round the sites'
#: gradients at the round's model are averaged and every site steps on its own gradient
#: corrected towards that average (:mod:`fedseg.fusion.federated`), or plain FedAvg
FUSION_CORRECTIONS: tuple[str, ...] = ("gradient", "none")

#: secure-aggregation modes (``secure-aggregation`` key)
SECURE_MODES: tuple[str, ...] = ("none", "secagg+", "ckks")


#: what a run did before its key existed, where that differs from the key's default now: a
#: checkpoint or model card written by such a fedseg lacks the key and ran this way
LEGACY_VALUES: dict[str, Any] = {"bias-correction": "none", "fusion-correction": "none"}


@dataclass(frozen=True)
class FedsegConfig:
    """Validated configuration. Field names are the snake_case form of the kebab-case keys."""

    # a named set of values (PRESETS); "cpu-demo" is these defaults
    preset: str = "cpu-demo"
    # model / data geometry
    spatial_dims: int = 3
    image_size: int = 48
    patch_size: int = 48
    base_channels: int = 8
    depth: int = 4
    max_channels: int = 0
    # 0: each case resized to image-size^3 (the quick CPU mode); > 0: cases kept on their own
    # grid, cropped to the brain and resampled to this voxel size (mm), trained on patches
    spacing: float = 0.0
    foreground_fraction: float = 0.33
    # n4 | none: bias-field correction of each modality before its z-score (fedseg.data.bias)
    bias_correction: str = "n4"
    # optimisation
    batch_size: int = 2
    learning_rate: float = 0.003
    # ``fedseg study`` only: these arms train with their own learning rate instead of
    # learning-rate (each chosen on validation cases with ``fedseg study --tune``; README)
    arm_learning_rates: str = (
        "centralized=0.03,local=0.005,fedavg=0.005,fedprox=0.003,scaffold=0.003,fedbn=0.008"
    )
    # `fedseg study`: an arm's own augment (ARM=AUGMENT, ...), chosen on validation cases at the
    # cpu-demo budget: a hospital training alone on 4-18 cases does better with it
    arm_augment: str = "local=basic"
    weight_decay: float = 0.00001
    # ``fedseg train`` only (a study's arms get num-server-rounds x local-epochs): at 20 the
    # validation Dice was still rising (BENCHMARKS "Cases of an independently modelled generator")
    epochs: int = 60
    # none | basic | nnunet | all, or groups "spatial,intensity,..." (true = basic, false = none).
    # cpu-demo: none, chosen on validation cases at the study's 20-epoch budget, where every set
    # that mirrors cost 3-7 points of Dice (BENCHMARKS "Augmentation ablation")
    augment: str = "none"
    # throughput: mixed precision (CUDA only) and DataLoader worker processes
    amp: str = "none"
    num_workers: int = 0
    device_augment: bool = False
    # native grid: hold the training cases on the training device and cut patches there (auto:
    # on a GPU when they take at most half of its free memory; off: read each patch from the
    # cache through the DataLoader; on: always, in RAM on a CPU)
    data_on_device: str = "auto"
    # cohort
    num_cases: int = 60
    test_fraction: float = 0.25
    val_fraction: float = 0.15
    seed: int = 0
    # federation (Flower ServerApp / ClientApp)
    strategy: str = "fedavg"
    num_server_rounds: int = 10
    local_epochs: int = 2
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_tau: float = 0.001
    server_momentum: float = 0.9
    fraction_train: float = 1.0
    min_fraction: float = 0.5
    round_timeout: float = 600.0
    num_sites: int = 4
    partition: str = "mixed"
    partition_alpha: float = 0.5
    data_path: str = ""
    partition_file: str = ""
    reset_optimizer: bool = False
    out_dir: str = ""
    # where prepared cases are cached ("": OUT/cache of the run; a deployed site's node config
    # key cache-dir wins, see fedseg.data.cache)
    cache_dir: str = ""
    # what the federation trains (#19): the segmentation network, or the image + clinical
    # fusion model of fedseg.fusion (its endpoint, feature set, image features' source, the
    # segmentation model that predicts the regions, and its local steps, step size, L2)
    task: str = "segmentation"
    fusion_endpoint: str = "grade"
    fusion_features: str = "fusion"
    fusion_image_source: str = "predicted"
    fusion_seg_model: str = ""
    fusion_local_steps: int = 20
    fusion_lr: float = 0.3
    fusion_l2: float = 1.0
    fusion_correction: str = "gradient"
    # robustness (#5): robust aggregation and simulated attacks
    aggregator: str = "mean"
    trim_fraction: float = 0.2
    byzantine_sites: int = 1
    update_clip_norm: float = 0.0
    anomaly_threshold: float = 0.0
    attack: str = "none"
    attack_strength: float = 10.0
    malicious_sites: str = ""
    inflate_factor: float = 1000.0
    # case-count weights (#24): bounded by the handshake and the site registry
    weighting: str = "examples"
    count_bound: str = "clip"
    count_jump_factor: float = 2.0
    site_registry: str = ""
    # privacy (#4): differential privacy and the per-site budget
    dp_mode: str = "none"
    dp_noise_multiplier: float = 0.0
    dp_clip_norm: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 0.00001
    dp_epsilon_budget: float = 0.0
    dp_trainable: str = "all"
    # the initial global model: a fedseg-model-v1 file (e.g. pretrained on public data)
    init_model: str = ""
    # secure aggregation (#4): SecAgg+ or CKKS homomorphic encryption
    secure_aggregation: str = "none"
    secagg_threshold: float = 0.5
    ckks_poly_degree: int = 4096
    ckks_scale_bits: int = 30
    secagg_clip_range: float = 1.0
    secagg_max_weight: float = 1000.0
    # compression of site -> server updates (#17): none | q8 | q4 | topk | q8z | q4z
    compression: str = "none"
    topk_fraction: float = 0.05
    # continual learning, phase B (#17): none (naive continued training) | ewc | lwf
    continual: str = "none"
    ewc_strength: float = 1000.0
    lwf_weight: float = 10.0
    lwf_temperature: float = 2.0
    lwf_regions: str = "et"
    # EWC's Fisher: asked of the sites at the end of a run and written to OUT/fisher.npz
    # (save-fisher, phase A), or read from a file by phase B (ewc-fisher; "": ask phase B's sites)
    save_fisher: bool = False
    ewc_fisher: str = ""
    # generalisation (#15): a hospital kept out of training and scored as unseen by the study
    # ("": none; "auto": the scanner mix furthest from the rest), and the normalisation FedBN
    # uses there first: "average" (the sites' averaged parameters) or "adapt" (adapted on the
    # hospital's unlabelled images); both are measured
    holdout_site: str = ""
    # or every case of one scanner profile, as a hospital of its own that no training hospital
    # shares a scanner with ("": none)
    holdout_scanner: str = ""
    unseen_norm: str = "average"
    # harmonisation (#15): "histogram" maps every case onto standard histogram landmarks that
    # the sites compute on their training cases and the server averages (fedseg.data.harmonise)
    harmonise: str = "none"
    # post-processing (BraTS convention): a predicted enhancing tumour smaller than this many
    # mm³ is relabelled necrosis (fedseg.model.postprocess); 0 = off. `fedseg continual`
    # chooses one per arm on training cases and reports it beside the raw figures
    et_min_volume: float = 0.0

    def __post_init__(self) -> None:
        _check(self.spatial_dims in (2, 3), "spatial-dims", "2 or 3", self.spatial_dims)
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check(self.image_size >= 16, "image-size", "an integer >= 16", self.image_size)
        div = 2 ** (self.depth - 1)
        _check(
            self.image_size % div == 0,
            "image-size",
            f"a multiple of {div} (2**(depth-1))",
            self.image_size,
        )
        _check(
            math.isfinite(self.spacing) and 0 <= self.spacing <= 10,
            "spacing",
            "0 (resize to image-size) or a voxel size in mm in (0, 10]",
            self.spacing,
        )
        from fedseg.data.bias import BIAS_CORRECTIONS

        _check(
            self.bias_correction in BIAS_CORRECTIONS,
            "bias-correction",
            f"one of {', '.join(BIAS_CORRECTIONS)}",
            self.bias_correction,
        )
        if self.spacing > 0:  # native grid: patches of any size the network can halve
            _check(
                self.patch_size >= 16 and self.patch_size % div == 0,
                "patch-size",
                f"a multiple of {div} (2**(depth-1)), at least 16",
                self.patch_size,
            )
        else:
            _check(
                16 <= self.patch_size <= self.image_size and self.patch_size % div == 0,
                "patch-size",
                f"a multiple of {div} between 16 and image-size ({self.image_size})",
                self.patch_size,
            )
        _check(
            self.spacing == 0 or self.spatial_dims == 3,
            "spacing",
            "0 with spatial-dims 2 (native patches are 3D)",
            self.spacing,
        )
        fg = self.foreground_fraction
        _check(0 <= fg <= 1, "foreground-fraction", "a number in [0, 1]", fg)
        _check(self.base_channels >= 2, "base-channels", "an integer >= 2", self.base_channels)
        _check(2 <= self.depth <= 6, "depth", "an integer in [2, 6]", self.depth)
        _check(
            self.max_channels == 0 or self.max_channels >= self.base_channels,
            "max-channels",
            "0 (no cap) or an integer >= base-channels",
            self.max_channels,
        )
        _check(self.batch_size >= 1, "batch-size", "an integer >= 1", self.batch_size)
        _check(self.learning_rate > 0, "learning-rate", "a number > 0", self.learning_rate)
        parse_arm_learning_rates(self.arm_learning_rates)
        object.__setattr__(
            self,
            "arm_augment",
            ",".join(
                f"{a}={v.replace(',', '+')}" for a, v in parse_arm_augment(self.arm_augment).items()
            ),
        )
        _check_choice("unseen-norm", self.unseen_norm, UNSEEN_NORMS)
        if self.holdout_site and self.holdout_scanner:
            raise ConfigError(
                f"config keys 'holdout-site' ({self.holdout_site!r}) and 'holdout-scanner' "
                f"({self.holdout_scanner!r}): hold out one hospital or one scanner profile, "
                "not both"
            )
        _check_choice("harmonise", self.harmonise, HARMONISE_METHODS)
        _check(
            math.isfinite(self.et_min_volume) and self.et_min_volume >= 0,
            "et-min-volume",
            "a number of mm³ >= 0 (0 = off)",
            self.et_min_volume,
        )
        _check(self.weight_decay >= 0, "weight-decay", "a number >= 0", self.weight_decay)
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        # frozen: the canonical form replaces what was given (a bool, "True", "mirror,spatial")
        object.__setattr__(self, "augment", parse_augment(self.augment))
        _check(
            self.spatial_dims == 3 or "elastic" not in augment_groups(self.augment),
            "augment",
            "no 'elastic' group with spatial-dims 2 (elastic deformation is 3D here)",
            self.augment,
        )
        _check_choice("amp", self.amp, AMP_MODES)
        _check(self.num_workers >= 0, "num-workers", "an integer >= 0", self.num_workers)
        _check_choice("data-on-device", self.data_on_device, DATA_ON_DEVICE)
        _check(self.num_cases >= 4, "num-cases", "an integer >= 4", self.num_cases)
        test = self.test_fraction
        _check(0 < test < 1, "test-fraction", "a number in (0, 1)", test)
        _check(0 <= self.val_fraction < 1, "val-fraction", "a number in [0, 1)", self.val_fraction)
        _check(
            self.test_fraction + self.val_fraction < 0.9,
            "val-fraction",
            "test-fraction + val-fraction < 0.9",
            self.val_fraction,
        )
        self._check_federation()
        self._check_robustness()
        self._check_privacy()
        self._check_secure()
        self._check_compression()
        self._check_task()

    def _check_federation(self) -> None:
        from fedseg.data.partition import SCHEMES

        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("partition", self.partition, SCHEMES)
        rounds = self.num_server_rounds
        _check(rounds >= 1, "num-server-rounds", "an integer >= 1", rounds)
        _check(self.local_epochs >= 1, "local-epochs", "an integer >= 1", self.local_epochs)
        _check(
            math.isfinite(self.proximal_mu) and self.proximal_mu >= 0,
            "proximal-mu",
            "a finite number >= 0",
            self.proximal_mu,
        )
        _check(
            math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0,
            "server-learning-rate",
            "a finite number > 0",
            self.server_learning_rate,
        )
        _check(
            math.isfinite(self.server_tau) and self.server_tau > 0,
            "server-tau",
            "a finite number > 0",
            self.server_tau,
        )
        beta = self.server_momentum
        _check(0 <= beta < 1, "server-momentum", "a number in [0, 1)", beta)
        frac = self.fraction_train
        _check(0 < frac <= 1, "fraction-train", "a number in (0, 1]", frac)
        _check(0 < self.min_fraction <= 1, "min-fraction", "a number in (0, 1]", self.min_fraction)
        _check(
            math.isfinite(self.round_timeout) and self.round_timeout > 0,
            "round-timeout",
            "a finite number of seconds > 0",
            self.round_timeout,
        )
        _check(self.num_sites >= 1, "num-sites", "an integer >= 1", self.num_sites)
        _check(
            math.isfinite(self.partition_alpha) and self.partition_alpha > 0,
            "partition-alpha",
            "a finite number > 0",
            self.partition_alpha,
        )
        _check(
            self.partition != "csv" or bool(self.partition_file),
            "partition-file",
            "a CSV path (case_id,site) when partition is 'csv'",
            self.partition_file,
        )

    def _check_robustness(self) -> None:
        """Validate the robust-aggregation and attack keys (#5)."""
        _check_choice("aggregator", self.aggregator, AGGREGATORS)
        _check_attack(self.attack)
        factor = self.inflate_factor
        _check(
            math.isfinite(factor) and factor >= 1, "inflate-factor", "a finite number >= 1", factor
        )
        from fedseg.strategies.weights import COUNT_BOUND_MODES, WEIGHTINGS

        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("count-bound", self.count_bound, COUNT_BOUND_MODES)
        jump = self.count_jump_factor
        _check(
            jump == 0 or (math.isfinite(jump) and jump > 1),
            "count-jump-factor",
            "0 (no flagging) or a finite number > 1",
            jump,
        )
        trim = self.trim_fraction
        _check(0 <= trim < 0.5, "trim-fraction", "a number in [0, 0.5)", trim)
        f = self.byzantine_sites
        _check(f >= 0, "byzantine-sites", "an integer >= 0", f)
        clip = self.update_clip_norm
        _check(math.isfinite(clip) and clip >= 0, "update-clip-norm", "a finite number >= 0", clip)
        thr = self.anomaly_threshold
        _check(math.isfinite(thr) and thr >= 0, "anomaly-threshold", "a finite number >= 0", thr)
        strength = self.attack_strength
        _check(math.isfinite(strength), "attack-strength", "a finite number", strength)
        robust = self.aggregator != "mean" or clip > 0 or thr > 0
        if robust and self.strategy in ("scaffold", "cyclic"):
            raise ConfigError.for_key(
                "aggregator",
                f"robust aggregation (aggregator, update-clip-norm, anomaly-threshold) works "
                f"with fedavg, fedprox, fedbn, fedadam, fedyogi, fedadagrad, not "
                f"'{self.strategy}' (SCAFFOLD's control variates and cyclic's single model "
                f"have no robust counterpart here); found aggregator {self.aggregator!r}",
            )

    def _check_privacy(self) -> None:
        """Validate the differential-privacy keys (#4)."""
        _check_choice("dp-mode", self.dp_mode, DP_MODES)
        _check_choice("dp-trainable", self.dp_trainable, DP_TRAINABLE)
        sigma = self.dp_noise_multiplier
        _check(
            math.isfinite(sigma) and sigma >= 0,
            "dp-noise-multiplier",
            "a finite number >= 0",
            sigma,
        )
        _check(
            self.dp_clip_norm > 0,
            "dp-clip-norm",
            "a number > 0 (inf: no clipping)",
            self.dp_clip_norm,
        )
        eps = self.dp_target_epsilon
        _check(math.isfinite(eps) and eps >= 0, "dp-target-epsilon", "a finite number >= 0", eps)
        _check(0 < self.dp_delta < 1, "dp-delta", "a number in (0, 1)", self.dp_delta)
        budget = self.dp_epsilon_budget
        _check(
            math.isfinite(budget) and budget >= 0,
            "dp-epsilon-budget",
            "a finite number >= 0 (0: no budget)",
            budget,
        )
        noisy = sigma > 0 or eps > 0
        _check(
            not (math.isinf(self.dp_clip_norm) and noisy),
            "dp-clip-norm",
            "a finite bound when dp-noise-multiplier or dp-target-epsilon is set",
            self.dp_clip_norm,
        )
        if self.dp_mode == "client" and self.aggregator != "mean":
            raise ConfigError.for_key(
                "dp-mode",
                f"client-level DP's noise (sigma * clip / sites) is "
                f"calibrated for the mean of clipped updates, not aggregator "
                f"{self.aggregator!r}; use aggregator 'mean' or dp-mode 'sample'",
            )
        if self.dp_mode == "sample" and self.spatial_dims == 2:
            raise ConfigError.for_key(
                "dp-mode",
                "sample-level DP-SGD accounts for one training case per "
                "sample, but a 2D model (spatial-dims 2) trains on every slice of every case, "
                "so its epsilon would be a per-slice figure; use spatial-dims 3 or dp-mode "
                "'client'",
            )
        if self.dp_mode == "client" and self.strategy in ("scaffold", "cyclic"):
            raise ConfigError.for_key(
                "dp-mode",
                f"client-level DP clips and noises averaged model updates, "
                f"which strategy '{self.strategy}' does not produce; use fedavg, fedprox, "
                f"fedbn, fedadam, fedyogi or fedadagrad",
            )

    def _check_secure(self) -> None:
        """Validate the secure-aggregation keys and refuse combinations that cannot work (#4)."""
        _check_choice("secure-aggregation", self.secure_aggregation, SECURE_MODES)
        thr = self.secagg_threshold
        _check(0 < thr <= 1, "secagg-threshold", "a number in (0, 1]", thr)
        clip = self.secagg_clip_range
        _check(math.isfinite(clip) and clip > 0, "secagg-clip-range", "a finite number > 0", clip)
        top = self.secagg_max_weight
        _check(math.isfinite(top) and top > 0, "secagg-max-weight", "a finite number > 0", top)
        from fedseg.secure.rules import check_secure_combination

        check_secure_combination(self)

    def _check_compression(self) -> None:
        """Validate the compression and continual-learning keys (#17)."""
        from fedseg.compression.codec import CODECS

        _check_choice("compression", self.compression, CODECS)
        frac = self.topk_fraction
        _check(0 < frac <= 1, "topk-fraction", "a number in (0, 1]", frac)
        from fedseg.continual import METHODS

        _check_choice("continual", self.continual, METHODS)
        for key, value in (
            ("ewc-strength", self.ewc_strength),
            ("lwf-weight", self.lwf_weight),
            ("lwf-temperature", self.lwf_temperature),
        ):
            _check(math.isfinite(value) and value > 0, key, "a finite number > 0", value)
        parse_lwf_regions(self.lwf_regions)
        if self.continual != "none" and not self.init_model:
            raise ConfigError.for_key(
                "continual",
                f"{self.continual!r} keeps what a phase-A model learned; "
                f"set init-model to that model (final_model.pt of phase A)",
            )
        if self.ewc_fisher and self.continual != "ewc":
            raise ConfigError.for_key(
                "ewc-fisher",
                f"only continual 'ewc' reads a Fisher file, found continual {self.continual!r}",
            )
        if self.save_fisher and (self.secure_aggregation != "none" or self.dp_mode != "none"):
            raise ConfigError.for_key(
                "save-fisher",
                "the sites' Fisher is a noiseless statistic of their "
                "gradients; it is not asked for in a private or secure run (dp-mode and "
                "secure-aggregation must be 'none')",
            )
        if self.continual != "none" and (
            self.secure_aggregation != "none" or self.dp_mode != "none"
        ):
            raise ConfigError.for_key(
                "continual",
                f"{self.continual!r} is not available with "
                f"secure-aggregation or dp-mode (EWC's Fisher is a noiseless statistic of the "
                f"sites' gradients, and neither term is wired into DP-SGD's per-sample "
                f"gradients); use continual 'none' for private or secure runs",
            )
        if self.compression != "none" and self.secure_aggregation != "none":
            raise ConfigError.for_key(
                "compression",
                f"{self.compression!r} cannot be combined with "
                f"secure-aggregation {self.secure_aggregation!r}: the server must decode each "
                f"site's update, which encryption (ckks) and masking (secagg+, which already "
                f"sends its own fixed-point encoding of the update) hide from it",
            )

    def _check_task(self) -> None:
        """Validate the task and fusion keys (#19)."""
        _check_choice("task", self.task, TASKS)
        _check_choice("fusion-endpoint", self.fusion_endpoint, FUSION_ENDPOINTS)
        _check_choice("fusion-features", self.fusion_features, FUSION_FEATURE_SETS)
        _check_choice("fusion-image-source", self.fusion_image_source, FUSION_IMAGE_SOURCES)
        _check_choice("fusion-correction", self.fusion_correction, FUSION_CORRECTIONS)
        steps = self.fusion_local_steps
        _check(steps >= 1, "fusion-local-steps", "an integer >= 1", steps)
        lr, l2 = self.fusion_lr, self.fusion_l2
        _check(math.isfinite(lr) and lr > 0, "fusion-lr", "a finite number > 0", lr)
        _check(math.isfinite(l2) and l2 >= 0, "fusion-l2", "a finite number >= 0", l2)

    @property
    def channels(self) -> tuple[int, ...]:
        """U-Net channels per level: base-channels doubled at each of ``depth`` levels.

        ``max-channels`` (when not 0) caps the deeper levels, as nnU-Net caps 3D U-Nets at 320.
        """
        widths = [self.base_channels * 2**i for i in range(self.depth)]
        if self.max_channels:
            widths = [min(w, self.max_channels) for w in widths]
        return tuple(widths)

    @property
    def epoch_budget(self) -> int:
        """Passes over local data every study arm gets: ``num-server-rounds`` x ``local-epochs``.

        A federated arm spends it as rounds of local epochs, a centralized or local-only arm
        as that many epochs in one go; ``epochs`` is only what ``fedseg train`` uses.
        """
        return int(self.num_server_rounds) * int(self.local_epochs)

    def replace(self, **changes: Any) -> FedsegConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_run_config(self) -> dict[str, Any]:
        """Return the kebab-case mapping (the Flower run-config form) of this config."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def unread_keys(self) -> frozenset[str]:
        """Run-config keys this config's task never reads: the fusion model's (``fusion-*``)
        in a segmentation run. A checkpoint ignores their values, so a changed fusion setting
        (or its default) does not stop a segmentation run from resuming."""
        if self.task == "segmentation":
            return frozenset(k for k in self.to_run_config() if k.startswith("fusion-"))
        return frozenset()

    def changed_keys(self, saved: Mapping[str, Any], may_change: Collection[str]) -> list[str]:
        """The run-config keys whose value differs from ``saved`` (a checkpoint's config).

        Keys in ``may_change`` (what a resume may change) and the keys this config's task never
        reads (:meth:`unread_keys`) are not compared. A key ``saved`` lacks (a checkpoint of a
        fedseg before the key existed) compares as the value such runs had
        (:func:`saved_defaults`). In this config's key order.
        """
        free = set(may_change) | self.unread_keys()
        now = self.to_run_config()
        before = saved_defaults()
        return [k for k in now if k not in free and saved.get(k, before[k]) != now[k]]

    def first_change(self, saved: Mapping[str, Any], may_change: Collection[str]) -> str:
        """The first of :meth:`changed_keys` in words, ``"'key': X there, Y now"`` (X as such
        runs had it when ``saved`` lacks the key), or ``""`` when nothing changed."""
        diffs = self.changed_keys(saved, may_change)
        if not diffs:
            return ""
        k = diffs[0]
        there = saved.get(k, saved_defaults()[k])
        return f"'{k}': {there!r} there, {self.to_run_config()[k]!r} now"

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], *, strict: bool = True) -> FedsegConfig:
        """The config a checkpoint or model card was written with.

        Like :meth:`from_run_config`, but a key ``saved`` lacks (written by a fedseg before the
        key existed) takes the value such runs had (:data:`LEGACY_VALUES`, else the default),
        so an older model is prepared and run as it was trained.
        """
        legacy = {k: v for k, v in LEGACY_VALUES.items() if k not in saved}
        return cls.from_run_config({**legacy, **saved}, strict=strict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, strict: bool = True) -> FedsegConfig:
        """Parse a kebab-case mapping (Flower run config, CLI overrides) into a config.

        Parameters
        ----------
        run_config:
            Keys in kebab-case as in ``[tool.flwr.app.config]``.
        strict:
            When true, an unknown key is an error; otherwise it is ignored (a Flower run config
            may carry keys meant for other components).

        Raises
        ------
        ConfigError
            For an unknown key (with the closest known key) or a value of the wrong type/range.
        """
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        run_config = apply_preset(run_config)
        for key, value in run_config.items():
            if key not in known:
                if strict:
                    hint = did_you_mean(key, list(known)) or (
                        " (the keys are those of [tool.flwr.app.config] in pyproject.toml, "
                        "README 'Configuration')"
                    )
                    raise ConfigError(f"unknown config key '{key}'{hint}")
                continue
            f = known[key]
            kwargs[f.name] = coerce_value(key, value, f.type)
        return cls(**kwargs)


def apply_preset(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` with the values of its ``preset`` filled in for the keys it lacks.

    A key that is given wins over the preset, so a complete mapping (``to_run_config``) is
    read back exactly.

    Raises
    ------
    ConfigError
        An unknown preset, with the allowed names.
    """
    out = dict(run_config)
    name = str(out.get("preset", "cpu-demo"))
    _check_choice("preset", name, tuple(PRESETS))
    for key, value in PRESETS[name].items():
        out.setdefault(key, value)
    if "image-size" in out and "patch-size" not in out and not _native(out.get("spacing", 0)):
        # whole volumes resized to the grid: the patch is the grid unless given (as --image-size)
        out["patch-size"] = out["image-size"]
    return out


def _native(spacing: Any) -> bool:
    """Whether a run-config ``spacing`` (maybe text) asks for the native grid; a value that is
    not a number is left for the config's own check to name."""
    try:
        return float(spacing) > 0
    except (TypeError, ValueError):
        return False


def given_keys(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a Flower run config that differ from their ``cpu-demo`` default.

    Flower hands a ServerApp and a ClientApp the ``pyproject.toml`` defaults merged with
    ``flwr run --run-config``, so there a key set to its default cannot be told from one not
    set; keeping only the others lets a ``preset`` given there fill the rest. (Under a preset,
    a key cannot be set back to its ``cpu-demo`` value through ``--run-config``.)
    """
    defaults = {f.name.replace("_", "-"): f.default for f in fields(FedsegConfig)}
    return {
        k: v
        for k, v in run_config.items()
        if k == "preset" or k not in defaults or not _same(v, defaults[k])
    }


def preset_config(name: str, **changes: Any) -> FedsegConfig:
    """The configuration of preset ``name`` (:data:`PRESETS`), with snake_case ``changes``.

    Raises
    ------
    ConfigError
        An unknown preset (with the allowed names) or a bad value.
    """
    cfg = FedsegConfig.from_run_config({"preset": name})
    return cfg.replace(**changes) if changes else cfg


def _same(given: Any, default: Any) -> bool:
    """Whether a run-config value (maybe text, from ``--set``) is the field's default."""
    if isinstance(given, str) and isinstance(default, bool):
        return given.strip().lower() in (("true", "1", "yes") if default else ("false", "0", "no"))
    if isinstance(given, str) and isinstance(default, (int, float)):
        try:
            return float(given) == float(default)
        except ValueError:
            return False
    return bool(given == default)


def parse_lwf_regions(value: object) -> tuple[int, ...]:
    """The output channels LwF distils, from ``lwf-regions`` (comma-separated ``wt``, ``tc``,
    ``et``, any order, each once; at least one).

    Returns
    -------
    tuple of int
        Channel indices in the model's WT, TC, ET order, sorted.

    Raises
    ------
    ConfigError
        Not a string, an empty list, an unknown or repeated region; the message names the key
        and the regions there are.
    """
    from fedseg.data.case import REGIONS

    names = [r.lower() for r in REGIONS]
    if not isinstance(value, str):
        raise ConfigError.for_key(
            "lwf-regions", f"expected comma-separated regions of {names}, found {value!r}"
        )
    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    if not parts:
        raise ConfigError.for_key("lwf-regions", f"expected at least one of {names}, found none")
    for p in parts:
        if p not in names:
            raise ConfigError.for_key(
                "lwf-regions", f"unknown region {p!r}; expected regions of {names}"
            )
    if len(set(parts)) != len(parts):
        raise ConfigError.for_key("lwf-regions", f"a region is named twice in {value!r}")
    return tuple(sorted(names.index(p) for p in parts))


def parse_augment(value: object) -> str:
    """The canonical form of an ``augment`` value.

    Parameters
    ----------
    value:
        ``True``/``False`` or their text forms (``true``, ``false``, ``1``, ``0``, ``yes``,
        ``no``: the values of the key when it was a boolean, meaning ``basic`` and ``none``), a
        set name of :data:`AUGMENT_SETS`, or a comma-separated list of :data:`AUGMENT_GROUPS`
        (or ``basic`` with ``bias-field`` and/or ``tumour-contrast``).

    Returns
    -------
    str
        A set name, or the groups in :data:`AUGMENT_GROUPS` order joined by commas (``basic``
        first).

    Raises
    ------
    ConfigError
        Anything else, naming the allowed sets and groups and the closest match.
    """
    if isinstance(value, bool):
        return "basic" if value else "none"
    text = str(value).strip().lower()
    if text in _AUGMENT_BOOLS:
        return _AUGMENT_BOOLS[text]
    if text in AUGMENT_SETS:
        return text
    parts = [p.strip() for p in text.split(",")]
    if "basic" in parts and len(parts) > 1:
        others = [p for p in parts if p != "basic"]
        if all(p in _WITH_BASIC for p in others) and len(set(others)) == len(others):
            return ",".join(["basic", *(g for g in AUGMENT_GROUPS if g in others)])
        raise ConfigError.for_key(
            "augment",
            f"'basic' is a set of its own and combines only with "
            f"{', '.join(_WITH_BASIC)}, found {value!r}",
        )
    wrong = [p for p in parts if p not in AUGMENT_GROUPS]
    if wrong or len(set(parts)) != len(parts):
        if wrong:
            hint = did_you_mean(wrong[0], [*AUGMENT_SETS, *AUGMENT_GROUPS])
        else:
            twice = next((p for p in parts if parts.count(p) > 1), text)
            hint = f"; '{twice}' is given twice"
        raise ConfigError.for_key(
            "augment",
            f"expected true, false, one of {', '.join(AUGMENT_SETS)}, "
            f"or a comma-separated list of distinct groups from {', '.join(AUGMENT_GROUPS)}, "
            f"found {value!r}{hint}",
        )
    return ",".join(g for g in AUGMENT_GROUPS if g in parts)


def augment_groups(value: str) -> tuple[str, ...]:
    """The augmentation groups of a canonical ``augment`` value (:func:`parse_augment`).

    ``none`` has none, ``nnunet`` has :data:`NNUNET_GROUPS`, ``all`` every group; ``basic`` is
    not made of groups and gives ``("basic",)`` (``basic,tumour-contrast`` both names).
    """
    if value == "none":
        return ()
    if value == "basic":
        return ("basic",)
    if value == "nnunet":
        return NNUNET_GROUPS
    if value == "all":
        return AUGMENT_GROUPS
    return tuple(value.split(","))


def _check(ok: bool, key: str, expected: str, found: object) -> None:
    if not ok:
        raise ConfigError.for_key(key, f"expected {expected}, found {found!r}")


def attack_parts(name: str) -> tuple[str, bool]:
    """Split an ``attack`` value into the reply/data attack and whether counts are inflated.

    ``"scale+inflate"`` -> ``("scale", True)``; ``"inflate"`` -> ``("inflate", True)``;
    ``"scale"`` -> ``("scale", False)``. The value is not validated (see :class:`FedsegConfig`).
    """
    base, sep, tail = str(name).partition("+")
    if sep and tail == INFLATE:
        return base, True
    return str(name), str(name) == INFLATE


def _check_attack(value: str) -> None:
    base, inflated = attack_parts(value)
    if "+" in str(value) and (not inflated or base in ("none", INFLATE) or base not in ATTACKS):
        raise ConfigError.for_key(
            "attack",
            f"a combined attack is ATTACK+inflate with ATTACK one of "
            f"{', '.join(a for a in ATTACKS if a not in ('none', INFLATE))}, found {value!r}",
        )
    _check_choice("attack", base, ATTACKS)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = did_you_mean(str(value), list(allowed))
        raise ConfigError.for_key(
            key, f"expected one of {', '.join(allowed)}, found {value!r}{hint}"
        )


def coerce_value(key: str, value: Any, type_name: Any) -> Any:
    """Coerce a run-config value to the field's type, refusing silent lossy conversions.

    ``type_name`` is a type or its name (``"bool"``, ``"int"``, ``"float"``, ``"str"``); other
    types pass ``value`` through. An integer may be given as ``3``, ``3.0`` or ``"3"``, never as
    ``2.5`` or ``True``.

    Raises
    ------
    ConfigError
        ``value`` is not of that type, naming ``key``.
    """
    tname = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    if tname == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError.for_key(key, f"expected true or false, found {value!r}")
    if tname == "int":
        if isinstance(value, bool):
            raise ConfigError.for_key(key, f"expected an integer, found {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError.for_key(key, f"expected an integer, found {value!r}")
    if tname == "float":
        if isinstance(value, bool):
            raise ConfigError.for_key(key, f"expected a number, found {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError.for_key(key, f"expected a number, found {value!r}") from None
    if tname == "str":
        return str(value)
    return value


def saved_defaults() -> dict[str, Any]:
    """The value of every key for a saved config that lacks it: :data:`LEGACY_VALUES`, else the
    key's default."""
    default = {f.name.replace("_", "-"): f.default for f in fields(FedsegConfig)}
    return {**default, **LEGACY_VALUES}
