"""Run configuration: one frozen dataclass, loaded from TOML and overridable from the command line.

Every field is both a TOML key (``local_steps = 10``) and a CLI flag (``--local-steps 10``): the flags are
generated from the fields, so the two can never drift apart. Values are validated on load; a bad key or
value is a ``UserError`` that names the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pser.errors import UserError

ALGORITHMS = ("dpsgd", "kgt", "gossip", "fedavg", "bagging")  # the registry in p2pser.exchange.algorithms
PARTITIONS = ("speaker", "dirichlet", "iid")
SECURITY = ("auto", "on", "off")
RESUME = ("auto", "off")
LIVENESS = ("adaptive", "fixed")
PEER_ADDRESS = ("strict", "key-only")
MIXINGS = ("average", "clipped", "trimmed")
ATTACKS = ("none", "sign-flip", "scale", "random")
MODELS = ("svm", "cnn1d-shallow", "cnn1d", "cnn2d", "crnn", "mlp", "xgb")  # p2pser.learn.models + ENSEMBLE_MODELS
# Models that are not averaged but learn by exchanging whole ensembles (p2pser.learn.bagging), and the one
# algorithm that exchanges them.
ENSEMBLE_MODELS = ("xgb",)
ENSEMBLE_ALGORITHM = "bagging"
BOOSTING = ("own", "cyclic", "histogram")  # p2pser.learn.bagging, p2pser.learn.histboost: how peers grow trees
OPTIMIZERS = ("adamw", "sgd")
NORMALIZERS = ("speaker", "global", "local")
OPTIMIZER_STATES = ("keep", "reset", "quasi-global")
# Dimensional emotions (issue 16): p2pser.partition.targets.TASK_NAMES and p2pser.learn.losses.REGRESSION_LOSSES.
TASKS = ("categorical", "dimensional", "both")
REGRESSION_LOSSES = ("ccc", "mse")
# Differential privacy and audits (issue 15): p2pser.learn.privacy, p2pser.exchange.privacy, p2pser audit.
DP_MODES = ("none", "utterance", "speaker")
DP_ACCOUNTANTS = ("rdp", "prv")
DP_NOISE = ("seeded", "os")
RECORD_UPDATES = ("off", "first-layer")  # what p2pser.exchange.recording keeps


AUGMENT_HELP = ("perturbed copies of each peer's own training utterances (never test ones): comma list of speed, "
                "pitch, noise, or none")
AUGMENT_COPIES_HELP = "--augment: copies per named perturbation (speed 0.9/1.1/0.95/1.05, pitch -2/+2/-1/+1, noise 20/15/25/10 dB SNR)"


def _opt(help_text: str, **choices: Any) -> dict:
    return {"metadata": {"help": help_text, **choices}}


@dataclass(frozen=True)
class RunConfig:
    """What one decentralized run is: data, model, algorithm, schedule, and the failure-handling limits."""

    folds: str | None = field(default=None, **_opt("folds file (folds.json format); default DATA_DIR/folds.json"))
    fold: int = field(default=1, **_opt("fold number (1-based) whose test speakers are held out"))
    test_speakers: str | None = field(default=None, **_opt("comma list of test speakers instead of --folds"))
    # The model and features with the best validation UA over RAVDESS and EmoDB (benchmarks/bench_ser.py,
    # BENCHMARKS.md "Stronger SER"): an MLP on the ComParE 2016 functionals.
    features: str = field(default="compare", **_opt("feature kind, e.g. compare, egemaps, mfcc, mfcc+pitch"))
    augment: str = field(default="none", **_opt(AUGMENT_HELP))
    augment_copies: int = field(default=1, **_opt(AUGMENT_COPIES_HELP))
    max_seconds: float = field(default=4.0, **_opt("utterances are cropped or zero-padded to this length"))
    model: str = field(default="mlp", **_opt("model name from the registry"))
    algorithm: str = field(default="dpsgd", **_opt("learning algorithm", choices=ALGORITHMS))
    boosting: str = field(
        default="own",
        **_opt("--model xgb: each peer boosts its own ensemble (own), or as many ensembles as peers travel the "
               "ring of peer ids and each peer adds --local-steps trees on its own data to the one it holds "
               "(cyclic), or all peers grow one ensemble whose splits are chosen on gradient histograms summed "
               "over every peer's data (histogram: needs every peer alive; --rounds diameter x (1 + 200 x 4) + 1 "
               "for the full 200 iterations)", choices=BOOSTING),
    )
    # The decentralized recipe's defaults (rounds, final_mixing, eval_every; AdamW kept across averages) were
    # chosen on validation speakers, never a fold's test speakers: benchmarks/bench_recipe.py.
    rounds: int = field(default=60, **_opt("rounds (dpsgd, fedavg) or local update blocks (gossip)"))
    local_steps: int = field(default=8, **_opt("minibatch SGD steps between two exchanges"))
    final_mixing: int = field(
        default=10, **_opt("dpsgd, kgt: averaging rounds without local steps after --rounds, so peers end on one model")
    )
    batch_size: int = field(default=16, **_opt("minibatch size of local training"))
    lr: float | None = field(default=None, **_opt("learning rate of local training (default: the model's recipe)"))
    optimizer: str | None = field(
        default=None, **_opt("local optimiser (default: the model's recipe)", choices=OPTIMIZERS)
    )
    momentum: float | None = field(default=None, **_opt("sgd, quasi-global: momentum (default 0.9)"))
    optimizer_state: str = field(
        default="keep",
        **_opt("the optimiser's local state after each averaging: keep it, reset it, or quasi-global momentum "
               "(SGD whose momentum follows the averaged model's moves)", choices=OPTIMIZER_STATES),
    )
    normalizer: str = field(
        default="speaker",
        **_opt("feature standardisation: each speaker by its own statistics (test speakers too, from their own "
               "unlabelled audio), all training data (peers agree on the statistics by gossip), or each peer "
               "by its own data", choices=NORMALIZERS),
    )
    stats_tolerance: float = field(
        default=1e-4, **_opt("--normalizer global: how closely peers' statistics agree with the pooled ones")
    )
    partition: str = field(default="speaker", **_opt("how training data is split into peers", choices=PARTITIONS))
    alpha: float = field(default=0.5, **_opt("Dirichlet concentration for --partition dirichlet"))
    val_fraction: float = field(default=0.15, **_opt("share of each peer's own data held back for validation"))
    seed: int = field(default=0, **_opt("seed for partition, initial weights and schedule"))
    eval_every: int = field(default=5, **_opt("evaluate validation and test UA every N rounds (and the last)"))
    round_timeout: float = field(default=20.0, **_opt("seconds a dpsgd/fedavg round waits for neighbours"))
    startup_timeout: float = field(default=120.0, **_opt("seconds the first round waits for neighbours to start"))
    consensus_threshold: float = field(
        default=0.0, **_opt("stop when consensus distance is below this and val UA is flat (0 = off)")
    )
    patience: int = field(default=5, **_opt("rounds of flat validation UA that count as converged"))
    time_budget: float = field(default=0.0, **_opt("stop after this many seconds (0 = no limit)"))
    cache_dir: str | None = field(default=None, **_opt("feature cache folder (default $P2PSER_CACHE_DIR or ~/.cache/p2pser/features)"))
    security: str = field(
        default="auto", **_opt("CurveZMQ encryption and key checks (auto: on when peers span hosts)", choices=SECURITY)
    )
    keys: str | None = field(default=None, **_opt("key folder of `p2pser keys new`, or this peer's peer-K.key file"))
    peer_address: str = field(
        default="strict",
        **_opt("strict: a neighbour's key is admitted only from its topology address; key-only: from any address "
               "(multi-homed hosts), logged", choices=PEER_ADDRESS),
    )
    checkpoint_every: int = field(
        default=5, **_opt("save model, optimiser and position every K rounds and at exit (0 = at exit only)")
    )
    resume: str = field(
        default="auto", **_opt("auto: a peer whose folder holds a checkpoint resumes from it", choices=RESUME)
    )
    liveness: str = field(
        default="adaptive",
        **_opt("per-neighbour deadlines learned from observed latency, or always --round-timeout", choices=LIVENESS),
    )
    mixing: str = field(
        default="average",
        **_opt("how neighbours' models are combined (clipped, trimmed: Byzantine-robust)", choices=MIXINGS),
    )
    trim: int = field(default=1, **_opt("--mixing trimmed: values dropped at each end of every coordinate"))
    clip_radius: float = field(
        default=0.0, **_opt("--mixing clipped: clipping radius (0 = adaptive, from the neighbours' distances)")
    )
    attack: str = field(
        default="none", **_opt("what --attackers send instead of their model (experiments)", choices=ATTACKS)
    )
    attackers: str | None = field(default=None, **_opt("comma list of peer ids that attack, e.g. 3,11"))
    attack_scale: float = field(default=10.0, **_opt("factor of --attack scale, noise std of --attack random"))
    pull_rate: float = field(
        default=0.5, **_opt("pull answers per second per neighbour after a burst of 4 (0 = no limit)")
    )
    # --- dimensional emotions (issue 16) ---
    task: str = field(
        default="categorical",
        **_opt("what is learned: emotion categories (UA), dimensions arousal/valence/dominance by regression "
               "(CCC), or both with one model", choices=TASKS),
    )
    regression_loss: str = field(
        default="ccc", **_opt("dimensions: 1 - CCC per minibatch, or mean squared error", choices=REGRESSION_LOSSES)
    )
    # -- differential privacy and audits (issue 15) --
    dp: str = field(
        default="none", **_opt("differential privacy: DP-SGD per utterance, or clip and noise each round's model "
                               "change so a peer's whole data set is protected", choices=DP_MODES)
    )
    dp_epsilon: float | None = field(
        default=None, **_opt("--dp: target epsilon for the whole run (the noise is calibrated to it)")
    )
    dp_delta: float = field(default=1e-5, **_opt("--dp: delta; must be below 1/records (utterances or peers)"))
    dp_clip: float | None = field(
        default=None, **_opt("--dp: L2 bound of an utterance's gradient (default 1.0) or of a round's model "
                             "change (default 0.5)")
    )
    dp_noise_multiplier: float | None = field(
        default=None, **_opt("--dp: noise std / clip, instead of calibrating to --dp-epsilon (which is then a cap)")
    )
    dp_accountant: str = field(default="rdp", **_opt("--dp: Opacus accountant (rdp, or prv: tighter)",
                                                     choices=DP_ACCOUNTANTS))
    dp_noise: str = field(
        default="seeded", **_opt("--dp: noise drawn from the run's seed (reproducible) or the OS's entropy "
                                 "(deployment: a neighbour who knows the seed could subtract seeded noise)",
                                 choices=DP_NOISE)
    )
    record_updates: str = field(
        default="off", **_opt("keep each peer's first-layer update per round for `p2pser audit`",
                              choices=RECORD_UPDATES)
    )

    def __post_init__(self) -> None:
        for name, allowed in (("algorithm", ALGORITHMS), ("partition", PARTITIONS), ("security", SECURITY),
                              ("optimizer_state", OPTIMIZER_STATES), ("normalizer", NORMALIZERS),
                              ("resume", RESUME), ("liveness", LIVENESS), ("mixing", MIXINGS), ("attack", ATTACKS),
                              ("peer_address", PEER_ADDRESS), ("task", TASKS),
                              ("regression_loss", REGRESSION_LOSSES), ("dp", DP_MODES),
                              ("dp_accountant", DP_ACCOUNTANTS), ("dp_noise", DP_NOISE),
                              ("record_updates", RECORD_UPDATES), ("boosting", BOOSTING)):
            if getattr(self, name) not in allowed:
                raise UserError(f"config key '{name}': {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("rounds", "local_steps", "batch_size", "eval_every", "patience", "fold", "augment_copies"):
            if getattr(self, name) < 1:
                raise UserError(f"config key '{name}' must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "alpha", "round_timeout", "startup_timeout", "max_seconds", "stats_tolerance"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UserError(f"config key '{name}' must be positive, got {getattr(self, name)}")
        for name in ("checkpoint_every", "trim", "clip_radius", "final_mixing", "pull_rate"):
            if getattr(self, name) < 0:
                raise UserError(f"config key '{name}' must not be negative, got {getattr(self, name)}")
        check_model_name(self.model)  # before any audio is read: a typo costs no feature extraction
        if (self.model in ENSEMBLE_MODELS) != (self.algorithm == ENSEMBLE_ALGORITHM):
            raise UserError(f"config keys 'model' and 'algorithm': {self.model!r} with {self.algorithm!r}; tree "
                            f"ensembles ({', '.join(ENSEMBLE_MODELS)}) learn with --algorithm {ENSEMBLE_ALGORITHM}, "
                            "and only they do")
        self.attacker_ids()  # a malformed list fails on load, not in the middle of a run
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UserError(f"config key 'optimizer': {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise UserError(f"config key 'momentum' must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"config key 'val_fraction' must be in [0, 1), got {self.val_fraction}")
        check_dp_values(self.dp, self.dp_epsilon, self.dp_delta, self.dp_clip, self.dp_noise_multiplier,
                        lambda name: f"config key '{name}'")
        from p2pser.features.augment import perturbations

        if perturbations(self.augment, self.augment_copies) and self.dp != "none":
            raise UserError("config keys 'augment' and 'dp': a perturbed copy is another record of the same "
                            "utterance, which the privacy accounting does not count; use one of them")

    def attacker_ids(self) -> frozenset[int]:
        """The peers that run ``attack`` (an experiment's Byzantine peers)."""
        try:
            return frozenset(int(v) for v in (self.attackers or "").split(",") if v.strip())
        except ValueError:
            raise UserError(f"config key 'attackers' must be a comma list of peer ids, got {self.attackers!r}") from None

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def check_dp_values(mode: str, epsilon: float | None, delta: float, clip: float | None, noise: float | None,
                    name_of: Any) -> None:
    """Differential-privacy settings a run cannot start with (``name_of(field)`` names a setting in the
    error: a config key, or a flag of ``p2pser train``)."""
    for name, value in (("dp_epsilon", epsilon), ("dp_clip", clip), ("dp_noise_multiplier", noise)):
        if value is not None and not value > 0:
            raise UserError(f"{name_of(name)} must be positive, got {value}")
    if not 0.0 < delta < 1.0:
        raise UserError(f"{name_of('dp_delta')} must be in (0, 1), got {delta}")
    if mode != "none" and epsilon is None and noise is None:
        raise UserError(f"--dp {mode} needs --dp-epsilon E (a target) or --dp-noise-multiplier S")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Evaluated once per class: per field it cost 45 ms of every `p2pser --help` (about 180 fields' flags).
    return typing.get_type_hints(cls)


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def _field_type(cls: type, f: dataclasses.Field) -> type:
    """The concrete scalar type of a field, unwrapping ``X | None``."""
    hint = _type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = _field_type(cls, f)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: key '{f.name}' must be {kind.__name__}, got {value!r}")
    return value


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or malformed file is a ``UserError`` naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}") from None


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type = RunConfig, *, config_flag: bool = True, sweep: tuple[str, ...] = ()
) -> None:
    """Add one flag per field (and ``--config FILE``); defaults stay None so the TOML file can fill them.

    Fields named in ``sweep`` take a comma list instead of one value (see ``expand_sweep``).
    """
    if config_flag:
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the options below")
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} [{default}]"
        if f.name in sweep:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text + " (a comma list sweeps)")
            continue
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text, **extra)


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    cls: type = RunConfig,
    table: str = "run",
    *,
    other_keys: frozenset[str] = frozenset(),
) -> Any:
    """Defaults, then the TOML file (its ``[table]``, or the top level), then non-None ``overrides``.

    ``other_keys`` are keys that another config class reads from the same flat file; they are skipped.
    """
    values: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    if path is not None:
        path = Path(path)
        data = read_toml(path, "config file")
        data = data.get(table, {k: v for k, v in data.items() if not isinstance(v, dict)})
        for key, value in data.items():
            name = key.replace("-", "_")
            if name in other_keys and name not in known:
                continue
            if name not in known:
                raise UserError(f"config file {path}: unknown key '{key}' (known: {', '.join(sorted(known))})")
            values[name] = _coerce(cls, known[name], value, f"config file {path}")
    for name, value in (overrides or {}).items():
        if name in known and value is not None:
            values[name] = _coerce(cls, known[name], value, "command line")
    return cls(**values)


def field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def expand_sweep(args: argparse.Namespace, cls: type, sweep: tuple[str, ...]) -> list[dict[str, Any]]:
    """One override dict per combination of the comma lists given for the ``sweep`` fields."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    axes = []
    for name in sweep:
        raw = getattr(args, name, None)
        if raw is None:
            continue
        kind = _field_type(cls, known[name])
        try:
            values = [kind(v.strip()) for v in str(raw).split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--{name.replace('_', '-')} {raw!r}: each value must be a {kind.__name__}") from None
        axes.append([(name, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def given_config_keys(args: argparse.Namespace, cls: type = RunConfig, table: str = "run") -> set[str]:
    """The fields set explicitly on a command line: as flags, or in its ``--config`` file."""
    known = field_names(cls)
    given = {name for name in known if getattr(args, name, None) is not None}
    if getattr(args, "config", None) is not None:
        data = read_toml(args.config, "config file")
        data = data.get(table, {k: v for k, v in data.items() if not isinstance(v, dict)})
        given |= {key.replace("-", "_") for key in data} & known
    return given


def config_from_args(args: argparse.Namespace, cls: type = RunConfig) -> Any:
    return load_config(getattr(args, "config", None), vars(args), cls)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class SimConfig:
    """The simulated network of ``p2pser simulate``: topology, size and the faults to inject."""

    topology: str = field(default="exponential", **_opt("topology kind (ring, torus, ...) or a topology file"))
    peers: int | None = field(default=None, **_opt("number of peers (default: one per training speaker)"))
    degree: int | None = field(default=None, **_opt("degree for random-regular and small-world topologies"))
    drop: float = field(default=0.0, **_opt("probability that a message is lost"))
    delay: str = field(default="const:0.005", **_opt("link delay distribution in virtual seconds"))
    step_time: str = field(default="const:0.05", **_opt("virtual seconds per local step, drawn per peer"))
    stragglers: float = field(default=0.0, **_opt("share of peers that compute slowly"))
    straggler_factor: float = field(default=5.0, **_opt("how many times slower a straggler computes"))
    churn: str | None = field(default=None, **_opt("crash/restart schedule, e.g. 3@10-20,5@15- (rounds), or random:0.25"))
    network_partition: str | None = field(
        default=None, **_opt("rounds START-END during which the lower and upper halves of the ids are cut apart")
    )
    baseline: str | None = field(
        default=None, **_opt("also train a baseline on pooled data in the same run", choices=("centralized",))
    )
    workers: int = field(
        default=0, **_opt("processes holding the peers' learners, trained in parallel (0: one per core, or 1 for "
                          "models under 20,000 parameters or stepped together by --batch-peers auto; 1: all in "
                          "this process); the same seed gives the same results with any number")
    )
    batch_peers: str = field(
        default="auto", **_opt("step the local training of peers that share one model together, vectorised "
                               "(auto: for light models on features computed once, the svm, in one learner "
                               "process; on: any supported model, in one process; off: one peer at a time); "
                               "the same results as off up to floating-point rounding", choices=("auto", "on", "off"))
    )


def train_config(cfg: RunConfig, **extra: Any):
    """The local-training recipe of a run: the model's recommended settings with the run's overrides.

    Peers and the pooled-data baseline both take it from here, so the two arms of a comparison can only
    differ in what the issue says they differ in (pooling and step count).
    """
    from p2pser.learn.trainer import recommended_config

    optimizer, momentum = cfg.optimizer, cfg.momentum
    if cfg.optimizer_state == "quasi-global":
        # The momentum lives outside the optimiser (p2pser.learn.learner.TorchLearner): plain SGD steps.
        optimizer, momentum = "sgd", 0.0
    return recommended_config(cfg.model, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=optimizer,
                              momentum=momentum, regression_loss=cfg.regression_loss, **extra)
