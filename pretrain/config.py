"""Run configuration: a tree of typed dataclasses, loaded from YAML plus dotted overrides.

Unknown keys, wrong types and impossible combinations are rejected before any
work starts, with a message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig
from models.fields import check_fields, spec
from parallel.config import ParallelConfig
from pretrain.errors import UserError


@dataclass
class DatasetSource:
    path: str = spec("", path="required")  # local MDS directory (holding train/, val/) or URL (s3://, gs://, ...)
    weight: float = spec(1.0, gt=0)


@dataclass
class MqarConfig:  # data.task=mqar: synthetic recall sequences (pretrain/data/mqar.py)
    pairs: int = spec(8, ge=1)  # key-value pairs per sequence; each key is queried once
    placement: str = spec("power", choices=("power", "uniform"))  # query gaps: Zoology's power law or uniform
    power_a: float = spec(0.01, gt=0, le=1)  # power law P(gap g) ~ (g+1)^(a-1)


@dataclass
class DataConfig:
    path: str = spec("", path="optional")  # one dataset (shorthand for a one-entry mixture)
    mixture: list[DatasetSource] = field(default_factory=list)
    cache_dir: str = spec("", path="optional")  # local cache for remote datasets (default: <run_dir>/data_cache)
    tokenizer: str = spec("", path="optional")  # sentencepiece .model or HF tokenizer.json (default: the dataset's copy)
    seq_len: int = spec(256, ge=1)
    shuffle: bool = True
    train_split: str = spec("train", nonempty=True)
    val_split: str = spec("val", nonempty=True)
    task: str = spec("lm", choices=("lm", "mqar"))  # mqar: train on generated recall sequences (no dataset)
    mqar: MqarConfig = field(default_factory=MqarConfig)

    def cache_path(self, run_dir: str | os.PathLike) -> str:
        """``cache_dir``, or the run's own ``<run_dir>/data_cache``."""
        return self.cache_dir or str(Path(run_dir) / "data_cache")


@dataclass
class OptimConfig:
    lr: float = spec(3e-4, gt=0)
    min_lr_ratio: float = spec(0.1, ge=0, le=1)
    weight_decay: float = spec(0.1, ge=0)
    beta1: float = spec(0.9, ge=0, lt=1)
    beta2: float = spec(0.95, ge=0, lt=1)
    eps: float = spec(1e-8, gt=0)
    grad_clip: float = spec(1.0, ge=0, note="0: no clipping")
    schedule: str = spec("cosine", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = spec(100, ge=0)
    decay_fraction: float = spec(0.2, gt=0, le=1)  # wsd: fraction of steps spent decaying
    name: str = spec("adamw", choices=("adamw", "muon"))  # Muon for weight matrices, AdamW for the rest
    muon_momentum: float = spec(0.95, ge=0, lt=1)  # Nesterov momentum of the Muon matrices
    muon_nesterov: bool = True
    muon_ns_steps: int = spec(5, ge=1, le=100)  # Newton-Schulz iterations
    muon_bucket_mb: float = spec(256.0, gt=0)  # full fp32 matrices gathered at once per rank


@dataclass
class TrainConfig:
    steps: int = spec(1000, ge=1)
    global_batch: int = spec(16, ge=1)  # sequences per optimizer step (all data-parallel ranks)
    micro_batch: int = spec(0, ge=0, note="0: global_batch / dp")  # sequences per forward on one rank
    seed: int = spec(0, ge=0)
    dtype: str = spec("fp32", choices=("fp32", "bf16"))  # autocast compute
    activation_checkpointing: str = spec("off", choices=("off", "full", "every_n"))
    ac_every: int = spec(2, ge=1)
    compile: bool = False
    deterministic: bool = True
    eval_every: int = spec(0, ge=0, note="0: only at the end")
    eval_batches: int = spec(8, ge=1)
    z_loss: float = spec(0.0, ge=0)
    fused_loss: bool = False  # chunked LM head + cross-entropy (no full logits)
    kernels: str = spec("auto", choices=("auto", "reference", "triton", "vendor"))  # env PRETRAIN_KERNELS wins
    nan_policy: str = spec("stop", choices=("stop", "skip"))
    preempt_grace_s: float = spec(120.0, ge=0)


@dataclass
class CheckpointConfig:
    every: int = spec(0, ge=0, note="0: only at the end")
    keep: int = spec(3, ge=0, note="the newest N checkpoints; 0: keep all")
    resume: str = spec("off", path="required", note="off | auto | a step_N directory")
    init_from: str = spec("", path="optional")  # weights only (e.g. an imported HF model or an upcycled MoE)
    lock_wait_s: float = spec(120.0, ge=0)  # resume=auto: seconds to wait for a live run holding the run dir to exit
    async_: bool = False  # `checkpoint.async`: stage to host memory, write in the background
    hf_every: int = spec(0, ge=0, note="0: off")  # also write Hugging Face weights to <run_dir>/hf/step_N every N steps


@dataclass
class LoggingConfig:
    run_dir: str = spec("runs/default", path="required")  # everything a run writes goes under it
    log_every: int = spec(1, ge=1)
    progress: str = spec("auto", choices=("auto", "bar", "plain", "off"))
    tensorboard: bool = False
    wandb: bool = False  # log metrics.jsonl records + the config to Weights & Biases (rank 0)
    wandb_project: str = spec("pretrain", nonempty=True)
    wandb_entity: str = ""  # default: the API key's default entity
    wandb_name: str = ""  # default: the run directory's name
    wandb_tags: list[str] = field(default_factory=list)
    # auto: online when a key and the network are there, else offline
    wandb_mode: str = spec("auto", choices=("auto", "online", "offline", "disabled"))


@dataclass
class HardwareConfig:  # what a preset is sized for; `pretrain plan` and tests/test_presets.py check it fits
    gpus: int = spec(0, ge=0, note="0: not named")
    gpu_type: str = spec("h100", choices=("h100", "h200", "a100", "b200", "cpu"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def validate(self) -> None:
        """Every field against its declaration (``spec(...)`` above), then rules across fields."""
        check_fields(self)
        self.model.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise UserError(f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.data.task == "mqar":
            from pretrain.data.mqar import check_mqar

            check_mqar(self.model.vocab_size, self.data.seq_len, self.data.mqar.pairs)
        if self.optim.name == "muon" and self.parallel.dp_engine == "deepspeed":
            raise UserError("optim.name: muon is not supported with parallel.dp_engine=deepspeed "
                            "(DeepSpeed owns the optimizer step); use the default fsdp engine")
        if self.checkpoint.async_ and self.parallel.dp_engine == "deepspeed":
            raise UserError("checkpoint.async: not supported with parallel.dp_engine=deepspeed (its engine "
                            "writes its own state synchronously); use checkpoint.async=false")
        if self.parallel.cp > 1:  # context parallel (parallel/context_parallel.py)
            from parallel.context_parallel import check_cp_layout, check_cp_model, check_cp_seq

            check_cp_layout(self.parallel)
            check_cp_seq(self.data.seq_len, self.parallel.cp)
            check_cp_model(self.model, self.parallel, self.parallel.tp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- YAML: 1.2-style booleans, so `resume: off` stays the string "off" ----------------

class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when present: 6x faster
    pass


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              __import__("re").compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)


# ---- building from dicts ------------------------------------------------------------

def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise UserError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(key, a, value)
            except UserError:
                continue
        raise UserError(f"{key}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"{key}: expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}: expected a string, got {value!r}")
    return value


_type_hints = functools.lru_cache(maxsize=None)(typing.get_type_hints)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (possibly partial) nested dict."""
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if keyword.iskeyword(k) and k + "_" in names:  # e.g. checkpoint.async -> field async_
            k = k + "_"
        if k not in names:
            raise UserError(f"{key}: unknown key; allowed: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(key, hints[k], v)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """YAML scalar parsing for override values; anything YAML cannot parse stays a string."""
    if text == "":
        return ""
    try:
        return yaml_load(text)
    except (yaml.YAMLError, ValueError):  # (ValueError: text libyaml cannot encode, e.g. surrogates)
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--a.b.c=value`` (or ``a.b.c=value``) overrides to a nested dict."""
    for ov in overrides:
        item = ov[2:] if ov.startswith("--") else ov
        if "=" not in item:
            raise UserError(f"override '{ov}': expected --key.path=value")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{ov}': '{k}' is not a section")
        # a string key takes the text as typed (YAML would turn 0x10 into 16, null into None)
        node[keys[-1]] = raw if _field_type(Config, keys) is str else _parse_scalar(raw)
    return data


def _field_type(cls, keys: list[str]):
    """The annotation of dotted key ``keys`` in dataclass ``cls`` (None if not a plain field path)."""
    tp = cls
    for k in keys:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _type_hints(tp).get(k)
    return tp


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a preset in ``configs/`` (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"config file not found: {name}")


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)  # presets may extend another preset
    if base:
        parent = load_yaml(resolve_config_path(base))
        data = _merge(parent, data)
    return data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """YAML file (or preset name) + dotted overrides -> validated Config."""
    data = _merge(base or {}, load_yaml(resolve_config_path(path)) if path else {})
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (``<run_dir>/config.yaml``, each checkpoint's copy)."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(config_yaml(cfg))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
