"""One typed, validated config schema for training runs (``qkvlab train``, ``qkvlab sweep``).

A config is a YAML file with the fields of ``TrainConfig`` (model fields under ``model:``),
plus ``key=value`` overrides on the command line with dotted names (``model.n_layer=6``).
Unknown keys get an error that lists the closest valid keys; bad values get an error that
says the accepted range. Both are ``UserError``s (exit code 2 in the CLI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qkvlab import guard, logits, models, optimizers, presets
from qkvlab.args import NONNEGATIVE, POSITIVE, Check, Key
from qkvlab.data import keys as data_keys
from qkvlab.errors import UserError
from qkvlab.models.config import ModelConfig

__all__ = ["TrainConfig", "apply_overrides", "config_keys", "load_config"]


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults give a small char-level GPT on Shakespeare."""

    name: str = "run"
    # data
    data: str = "shakespeare"
    tokenizer: str = "char"
    vocab_size: int = 512
    seq_len: int = 128
    val_fraction: float = 0.1
    online: bool = False
    icl_dim: int = 8
    icl_points: int = 32
    icl_noise: float = 0.0
    recall_keys: int = 64
    recall_values: int = 64
    recall_pairs: int = 16
    recall_queries: int = 1
    recall_min_pairs: int | None = None  # None: every sequence has recall_pairs
    # model (kind, sizes; data-dependent fields are filled in by the trainer)
    model: ModelConfig = field(default_factory=ModelConfig)
    # optimisation
    # a name of qkvlab.optimizers (adamw, adam-l2, sgd, muon); each says where λ acts and which of the
    # keys below it reads
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.0  # sgd
    muon_momentum: float = 0.95  # muon: torch's default
    muon_adjust_lr: str = "original"  # muon: torch's adjust_lr_fn, "original" or "match_rms_adamw"
    muon_per_head: list = field(default_factory=list)  # muon: roles (q, k, v, o) orthogonalised per head
    muon_ns_dtype: str = "bfloat16"  # muon: Newton–Schulz in torch's bfloat16, or float32 (fast on CPUs)
    # corrected weight decay (adamw, muon): these roles' decay follows the schedule, λ_t = λ·η_t/η_max,
    # so p ← p(1 − λ·η_t²/η_max); a list of roles, or [all]
    corrected_weight_decay: list = field(default_factory=list)
    # rank guard (adamw, muon; qkvlab.guard): at every spectral-monitor firing, each layer's decay of (q, k)
    # and of (v, o) becomes clip(λ·exp(κ(erank_min − target)/d_head), λ_min, λ_max); target = fraction × d_head
    rank_guard_qk: float = 0.0  # target effective rank of W_KᵀW_Q as a fraction of d_head; 0 = unguarded
    rank_guard_ov: float = 0.0  # the same for P·W_V
    rank_guard_kappa: float = 2.0  # κ
    rank_guard_min: float = 1e-3  # λ_min
    rank_guard_max: float = 10.0  # λ_max
    # QK-clip (qkvlab.logits): heads whose largest logit passed qk_clip have their q/k rows scaled back to it
    qk_clip: float = 0.0  # τ; 0 = off
    qk_clip_roles: list = field(default_factory=lambda: ["q", "k"])  # √γ on each, or γ on one of them
    logit_every: int = (
        0  # measure the logits every N steps too (train lines' logit_max); 0 = monitor steps only
    )
    preset: str | None = None  # e.g. "decoupled-attn:attn_weight_decay=0"
    overrides: dict = field(default_factory=dict)  # {role: {lr_scale, weight_decay}}
    train_roles: list | None = None  # roles that train; None = all
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    batch_size: int = 32  # global: split across DDP ranks
    max_steps: int = 1000
    stop_at: int | None = None  # stop (with a checkpoint) after this step, as if interrupted
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # several processes: ddp (each holds the model) | fsdp (FSDP2 shards it)
    # monitoring and output
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20  # 0 = the whole validation split
    spectra_every: int = 200  # 0 = off
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # A step whose loss or gradient norm is not finite is skipped (no update), logged, and counted;
    # one more than this stops the run in one line, keeping the last good checkpoint.
    max_bad_steps: int = 0
    tensorboard: bool = True
    progress: bool = True
    out: str = "runs/{name}"

    def run_dir(self) -> Path:
        try:
            return Path(self.out.format(name=self.name))
        except (KeyError, IndexError, ValueError, AttributeError):
            raise UserError(
                f"out={self.out!r} is not a folder template; accepted: a path, optionally with {{name}}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """The values of one section of :func:`sections` (``data``, ``model``, ``optim``, …), by key
        without the ``model.`` prefix: what its component reads, passed whole."""
        keys = sections()[name]
        return {
            key.removeprefix("model."): getattr(self.model, key[6:])
            if key.startswith("model.")
            else getattr(self, key)
            for key in keys
        }

    def rank_guard(self) -> Any:
        """The :class:`qkvlab.guard.RankGuard` these keys describe, or None when neither target is set."""
        if not (self.rank_guard_qk or self.rank_guard_ov):
            return None
        from qkvlab.guard import RankGuard

        return RankGuard(
            self.rank_guard_qk or None,
            self.rank_guard_ov or None,
            self.rank_guard_kappa,
            self.rank_guard_min,
            self.rank_guard_max,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        config = cls()
        flat = _flatten(data)
        for key in [
            k for k in flat if k.removeprefix("model.") in _DERIVED_MODEL_FIELDS and k.startswith("model.")
        ]:
            setattr(config.model, key[6:], flat.pop(key))  # saved run configs carry the data-derived sizes
        apply_overrides(config, flat)
        return config


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "model" and isinstance(value, Mapping) and not prefix:
            flat.update(_flatten(value, "model."))
        else:
            flat[prefix + str(key)] = value
    return flat


# Keys a resume may change: they decide what is logged, measured and kept, never what is learned.
# Everything else (model, data, tokenizer, seed, batch size, optimiser, lr, weight decay, schedule,
# warm-up, precision, out, …) is fixed for a run. max_steps is changeable only with a constant
# schedule (cosine and linear decay are laid out over max_steps).
RESUME_CHANGEABLE = frozenset(
    {
        "log_every",
        "eval_every",
        "eval_batches",
        "spectra_every",
        "logit_every",
        "checkpoint_every",
        "keep_checkpoints",
        "stop_at",
        "progress",
        "tensorboard",
        "max_bad_steps",
        "device",
        "parallel",
    }
)


def resume_changeable(key: str, config: TrainConfig) -> bool:
    if key == "spectra_every" and config.rank_guard():  # the guard acts when the monitor fires
        return False
    return key in RESUME_CHANGEABLE or (key == "max_steps" and config.schedule == "constant")


def resume_changes(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every config key that differs between the two."""
    a, b = _flatten(saved.to_dict()), _flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(saved: TrainConfig, new: TrainConfig, run_dir: Path) -> None:
    """Refuse, in one line and before anything is written, a resume that changes a fixed key."""
    fixed = {
        k: v
        for k, v in resume_changes(saved, new).items()
        if not resume_changeable(k, saved) and k.removeprefix("model.") not in _DERIVED_MODEL_FIELDS
    }
    fixed.pop("out", None)  # checked below by the folder it names, not by its spelling
    if new.out != saved.out and Path(new.run_dir()).resolve() != Path(run_dir).resolve():
        fixed["out"] = (saved.out, new.out)
    if fixed:
        changes = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in fixed.items())
        raise UserError(
            f"cannot resume {run_dir} with {changes}: fixed for a run (start a new run for that); "
            f"changeable on resume: {', '.join(sorted(RESUME_CHANGEABLE))}, and max_steps with schedule=constant"
        )


#: The run's own section: the schedule, the loop, what is logged, measured and kept, where it goes.
RUN_KEYS: dict[str, Key] = {
    "name": ("the run's name; {name} in out= and the TensorBoard run", None),
    "online": ("stream the training data once through one permutation, never repeating a sample", None),
    "schedule": (
        "cosine | linear | constant, after the warm-up",
        (lambda v: v in ("cosine", "linear", "constant"), "cosine, linear or constant"),
    ),
    "warmup_steps": ("linear warm-up steps (must be below max_steps)", NONNEGATIVE),
    "min_lr_ratio": ("cosine/linear: the final lr as a fraction of lr", (lambda v: 0 <= v <= 1, "in [0, 1]")),
    "grad_clip": ("clip the global gradient norm to this; 0 = off", NONNEGATIVE),
    "batch_size": ("global batch size (split across torchrun ranks)", POSITIVE),
    "max_steps": ("optimiser steps in the run", POSITIVE),
    "stop_at": ("stop after this step with a checkpoint, as if interrupted", POSITIVE),
    "seed": (
        "seed of the model, the data order and the sampled data (0 … 2³¹−1)",
        (lambda v: 0 <= v <= 2**31 - 1, "an integer in [0, 2147483647]"),
    ),
    "precision": ("fp32 | bf16 (autocast)", (lambda v: v in ("fp32", "bf16"), "fp32 or bf16")),
    "device": ("auto | cpu | cuda", (lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda")),
    "parallel": (
        "with several processes: ddp (each holds the whole model) | fsdp (FSDP2 shards it)",
        (lambda v: v in ("ddp", "fsdp"), "ddp or fsdp"),
    ),
    "log_every": ("steps between train-loss log lines", POSITIVE),
    "eval_every": ("steps between validation passes", NONNEGATIVE),
    "eval_batches": ("validation batches per pass; 0 = the whole split", NONNEGATIVE),
    "spectra_every": (
        "steps between spectral-monitor firings (spectra.jsonl, TensorBoard); 0 = off",
        NONNEGATIVE,
    ),
    "checkpoint_every": ("steps between checkpoints", POSITIVE),
    "keep_checkpoints": ("how many checkpoints to keep", POSITIVE),
    "max_bad_steps": ("non-finite steps skipped before the run stops in one line", NONNEGATIVE),
    "tensorboard": ("write TensorBoard scalars to OUT/tb", None),
    "progress": ("show a progress bar", None),
    "out": ("the run folder; {name} is replaced by name", None),
}


def sections() -> dict[str, dict[str, Key]]:
    """Every config key, by the component that owns it (its help line and its check live there)."""
    return {
        "data": data_keys.KEYS,
        "model": models.keys(),
        "optim": optimizers.keys(),
        "per-matrix": presets.KEYS,
        "guard": guard.KEYS,
        "logits": logits.KEYS,
        "run": RUN_KEYS,
    }


#: One line per config key, for ``qkvlab train --help-keys`` (a test checks that every key has one).
KEY_HELP: dict[str, str] = {key: line for keys in sections().values() for key, (line, _) in keys.items()}


def config_keys() -> list[str]:
    top = [f.name for f in fields(TrainConfig) if f.name != "model"]
    model = [f"model.{f.name}" for f in fields(ModelConfig) if f.name not in _DERIVED_MODEL_FIELDS]
    return top + model


# Names users bring from other tools, for the "did you mean" hint.
_ALIASES = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "steps": "max_steps",
    "max_iters": "max_steps",
    "warmup": "warmup_steps",
    "block_size": "seq_len",
    "context": "seq_len",
    "n_layer": "model.n_layer",
    "n_head": "model.n_head",
    "d_model": "model.d_model",
    "n_embd": "model.d_model",
    "clip": "grad_clip",
    "max_grad_norm": "grad_clip",
}

# Filled from the data; a user setting them would be overwritten, so they are not keys.
_DERIVED_MODEL_FIELDS = {"vocab_size", "seq_len", "image_size", "channels", "n_classes", "input_dim", "extra"}

# Accepted values per key, from the sections: (predicate, description of what is accepted).
_CHECKS: dict[str, Check] = {
    key: check for keys in sections().values() for key, (_, check) in keys.items() if check is not None
}


def _field_type(key: str) -> Any:
    cls, name = (ModelConfig, key[6:]) if key.startswith("model.") else (TrainConfig, key)
    return {f.name: f.type for f in fields(cls)}[name]


def _coerce(key: str, value: Any) -> Any:
    """Parse CLI strings and YAML values into the field's type."""
    kind = str(_field_type(key))
    given = value  # what the user wrote, for the messages (YAML reads "" as None)
    optional = "None" in kind
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    if isinstance(value, str) and not kind.startswith("str"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{key}={value!r} is not a valid value") from None
    base = kind.replace(" | None", "")
    if base == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{key}={given!r}; accepted: true or false")
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise UserError(f"{key}={given!r}; accepted: an integer")
    elif base == "float":
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{key}={given!r}; accepted: a number")
        value = float(value)
    elif base == "str":
        value = str(value)
    elif base == "dict":
        if not isinstance(value, Mapping):
            raise UserError(f"{key} must be a mapping, e.g. {{v: {{lr_scale: 4}}}}; got {value!r}")
        value = dict(value)
    elif base == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise UserError(f"{key} must be a list such as [q, v]; got {value!r}")
        value = list(value)
    return value


def coerce_value(key: str, value: Any) -> Any:
    """``value`` of config key ``key`` as training reads it (``"1e-3"`` and ``"0.001"`` are one value)."""
    return _coerce(key, value)


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Set dotted keys on ``config`` in place, validating each; returns it."""
    valid = config_keys()
    for key, raw in overrides.items():
        if key not in valid:
            close = (
                [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            )
            if close:
                raise UserError(
                    f"unknown config key {key!r}; did you mean {' or '.join(close)}? (`qkvlab train --help-keys` lists all)"
                )
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        value = _coerce(key, raw)
        if key == "optimizer":
            value = optimizers.normalise(value)  # an earlier spelling (adam) loads as today's (adam-l2)
        check = _CHECKS.get(key)
        if check is not None and value is not None and not check[0](value):
            raise UserError(f"{key}={value!r} is out of range; accepted: {check[1]}")
        target, name = (config.model, key[6:]) if key.startswith("model.") else (config, key)
        setattr(target, name, value)
    return config


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["lr=3e-4", "model.n_layer=6"]`` → dict; a malformed item is a UserError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} must look like key=value (e.g. lr=3e-4)")
        # a path keeps its spaces, so that out="DIR " is refused instead of writing into DIR
        out[key.strip()] = value if key.strip() == "out" else value.strip()
    return out


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the example configs shipped inside the package (``qkvlab train shakespeare-gpt``)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config(path: str | os.PathLike[str]) -> Path:
    """A config file: the path itself if it exists, else a packaged config of that name (with or
    without ``.yaml``), so the examples work from any directory."""
    file = Path(path)
    if file.is_file():
        return file
    name = file.name[: -len(".yaml")] if file.name.endswith(".yaml") else file.name
    packaged = PACKAGED_CONFIGS / f"{name}.yaml"
    if file.parent == Path(".") and packaged.is_file():
        return packaged
    raise UserError(f"no such config file: {path}; packaged configs: {', '.join(packaged_configs())}")


def load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A config from YAML (or JSON), a file or a packaged name, plus overrides; ``path=None`` starts from
    the defaults."""
    data: Mapping[str, Any] = {}
    if path is not None:
        file = resolve_config(path)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path} is not UTF-8 text (byte {exc.start}); accepted: a YAML or JSON file"
            ) from None
        if not isinstance(data, Mapping):
            raise UserError(f"{path} must hold a mapping of config keys, found {type(data).__name__}")
    config = TrainConfig.from_dict(data)
    if overrides:
        apply_overrides(config, overrides)
    _check_consistency(config)
    return config


def _check_consistency(config: TrainConfig) -> None:
    """What no single key can say alone, each section checking its own (before any data or model)."""
    # an unknown preset, preset argument, role or override setting fails here
    presets.optimizer_settings(config.preset, overrides=config.overrides, train=config.train_roles)
    config.run_dir()  # a bad out= template fails here
    guard.validate(config)
    logits.validate(config)
    models.validate(config.model)
    if config.stop_at is not None and config.stop_at > config.max_steps:
        raise UserError(f"stop_at={config.stop_at} is beyond max_steps={config.max_steps}")
    if config.warmup_steps >= config.max_steps and config.warmup_steps > 0:
        raise UserError(
            f"warmup_steps={config.warmup_steps} must be < max_steps={config.max_steps}; accepted: warmup_steps="
            f"0 … {config.max_steps - 1} (e.g. warmup_steps={config.max_steps // 10}, a tenth of the run)"
        )


def dump_config(config: TrainConfig, path: Path) -> None:
    from qkvlab.files import write_atomic

    write_atomic(path, json.dumps(config.to_dict(), indent=1))


def saved_config(run_dir: Path) -> TrainConfig:
    """The config a run folder was trained with (its ``config.json``); a UserError if there is none."""
    from qkvlab.files import refuse_links

    refuse_links(Path(run_dir))  # before anything is read from a folder that qkvlab will write into
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"cannot resume {run_dir}: no config.json there (is it a qkvlab run folder?)")
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot resume {run_dir}: {path} is damaged (not JSON: {exc})") from None
    if not isinstance(saved, dict):
        raise UserError(
            f"cannot resume {run_dir}: {path} is damaged (a JSON {type(saved).__name__}, not an object)"
        )
    try:
        return TrainConfig.from_dict(saved)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot resume {run_dir}: {path} is damaged ({exc})") from None
