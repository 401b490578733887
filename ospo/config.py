"""The run configuration: one documented dataclass per stage, composed into ``Config``.

Loaded from YAML, then overridden by ``key=value`` flags (``perturb.num_variants=2``),
then validated. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key, before any model is loaded.

Every default says where it comes from: "OSPO sec. X" (arXiv 2506.02015 v3), "public
code" (the paper's released implementation, for settings the paper's text leaves out),
or "ours" with the reason.

Validation of types is pydantic's (lax mode: YAML's ``1e-5`` string and command-line
strings coerce to the declared type); value checks are in each ``__post_init__``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from ospo import templates

SCHEMA_VERSION = 1
STAGES = ("prompts", "perturb", "images", "vqa", "train")

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(Exception):
    """A configuration problem, with the offending key in the message.

    Not a ValueError on purpose: pydantic would catch and re-wrap it."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(config=_STRICT)
class ModelConfig:
    path: str = "tiny:"
    """Checkpoint for ``JanusForConditionalGeneration.from_pretrained``: a hub id
    (``deepseek-community/Janus-Pro-1B``) or a local directory. ``tiny:`` builds (once, cached
    under ~/.cache/ospo) a random tiny Janus for tests and smoke runs (ours)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on CPU (ours; the public code runs bf16 on GPU)."""
    device: str = "auto"
    """``auto``: the local CUDA device of this rank if there is one, else CPU."""


@dataclass(config=_STRICT)
class RunConfig:
    name: str = "default"
    """Name of the run; the work directory defaults to ``runs/<name>``."""
    seed: int = 0
    """Run seed. Per-item seeds derive from (seed, stage, id, ...), never from position."""
    iterations: int = 1
    """Self-improvement iterations for ``--stage all`` (OSPO sec. 5.3 runs up to 3)."""

    def __post_init__(self):
        _check(self.iterations >= 1, "run.iterations", f"must be >= 1, got {self.iterations}")
        _check(bool(self.name) and "/" not in self.name, "run.name", f"must be a plain name, got {self.name!r}")


@dataclass(config=_STRICT)
class PromptsConfig:
    input: str | None = None
    """User-supplied prompts instead of model-written ones: a JSONL file (``prompt``, optional
    ``objects``, ``category``, ``sub_category``, ``id``) or a text file (one prompt a line).
    Prompts without objects get them named by the model."""
    seed_examples: str | None = None
    """JSONL of few-shot seed examples (``sub_category``, ``prompt``, ``objects``) replacing the
    built-in ones of ``ospo.templates`` for the sub-categories it covers (ours: a domain such
    as ShapesWorld needs examples in its own language)."""
    num_prompts: int = 20000
    """Base prompts per iteration, split evenly over ``sub_categories`` (OSPO sec. 3.3 / 4.1
    generate 20,000)."""
    sub_categories: list[str] = field(default_factory=lambda: list(templates.SUB_CATEGORIES))
    """Sub-categories to write (OSPO sec. 3.3: color, shape, texture, spatial_2d, spatial_3d,
    numeracy, non_spatial, complex)."""
    num_shots: int = 3
    """Few-shot examples per request (ours)."""
    per_request: int = 3
    """Prompts asked for in one request (ours)."""
    samples_per_forward: int = 8
    """Requests sampled in one batched forward (ours; raise on a large GPU)."""
    refresh_every: int = 32
    """Replace the few-shot examples with accepted outputs every this many accepted prompts
    of a sub-category, so the set does not collapse onto the seeds (ours)."""
    max_requests_factor: float = 4.0
    """Give up on a sub-category after quota * factor / per_request requests (ours): a model
    that never writes a valid prompt ends the stage instead of looping forever."""
    max_new_tokens: int = 160
    temperature: float = 1.0
    """Sampling temperature for prompt writing (ours: diversity matters here)."""
    top_p: float = 0.95
    max_objects: int = 6
    """Prompts naming more objects than this are rejected (ours)."""

    def __post_init__(self):
        _check(self.num_prompts >= 1, "prompts.num_prompts", f"must be >= 1, got {self.num_prompts}")
        unknown = [s for s in self.sub_categories if s not in templates.CATEGORY_OF]
        _check(not unknown, "prompts.sub_categories", f"unknown {unknown}; known: {templates.SUB_CATEGORIES}")
        _check(bool(self.sub_categories), "prompts.sub_categories", "must not be empty")
        for k in ("num_shots", "per_request", "samples_per_forward", "refresh_every", "max_new_tokens", "max_objects"):
            _check(getattr(self, k) >= 1, f"prompts.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.temperature >= 0, "prompts.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "prompts.top_p", "must be in (0, 1]")
        _check(self.max_requests_factor > 0, "prompts.max_requests_factor", "must be > 0")


@dataclass(config=_STRICT)
class PerturbConfig:
    input: str | None = None
    """User-supplied variants (JSONL, one record per prompt id with ``variants``: a list of
    slots with ``op``, ``perturbed`` and optionally ``dense``/``perturbed_dense``). Missing dense
    prompts are written by the model (or equal the prompts when ``densify`` is false)."""
    num_variants: int = 3
    """N perturbations per prompt (OSPO sec. 3.4: N = 3)."""
    densify: bool = True
    """Jointly densify each (x, x~) pair (OSPO sec. 3.4); false is the paper's ablation
    (sec. 5.1.3): the dense prompts are the prompts themselves."""
    batch_size: int = 16
    """Requests per batched forward (ours)."""
    max_new_tokens: int = 48
    """For one perturbed prompt (one line)."""
    max_new_tokens_dense: int = 160
    """For the two dense prompts of a pair."""
    temperature: float = 0.7
    """Ours: perturbations should be faithful edits, less diverse than base prompts."""
    top_p: float = 0.95

    def __post_init__(self):
        _check(self.num_variants >= 1, "perturb.num_variants", f"must be >= 1, got {self.num_variants}")
        for k in ("batch_size", "max_new_tokens", "max_new_tokens_dense"):
            _check(getattr(self, k) >= 1, f"perturb.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.temperature >= 0, "perturb.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "perturb.top_p", "must be in (0, 1]")


@dataclass(config=_STRICT)
class ImagesConfig:
    guidance_scale: float = 5.0
    """Classifier-free guidance weight (OSPO sec. 3.5 / Janus-Pro default: 5)."""
    temperature: float = 1.0
    """Visual-token sampling temperature (OSPO sec. 3.5: 1)."""
    batch_size: int = 64
    """Images sampled per step (each is a cond + an uncond row). 64 fills an 80 GB GPU with
    Janus-Pro-7B's 576-token KV cache with room to spare (ours); lower it on small cards."""
    skip_layers: int = 5
    """Masks average attention over layers [s, L - s) (OSPO sec. 3.5.2: 5). Clamped against the
    loaded model so at least one layer remains; the layers used are recorded."""
    mask_source: Literal["sampling", "teacher_forced"] = "sampling"
    """``sampling``: attention captured while sampling, from the fed (dense) prompt (ours,
    design decision). ``teacher_forced``: one forward over the original prompt x and the
    sampled tokens (the public code's way, minus its PNG re-encoding)."""
    capture_masks: bool = True
    """Turn mask capture off to sample images only (benchmarks)."""

    def __post_init__(self):
        _check(self.guidance_scale > 1.0, "images.guidance_scale", f"must be > 1 (1 disables CFG), got {self.guidance_scale}")
        _check(self.temperature > 0, "images.temperature", "must be > 0")
        _check(self.batch_size >= 1, "images.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.skip_layers >= 0, "images.skip_layers", f"must be >= 0, got {self.skip_layers}")


@dataclass(config=_STRICT)
class VqaConfig:
    input: str | None = None
    """User-supplied questions: JSONL with ``id`` and ``questions`` (list of strings)."""
    min_questions: int = 2
    """Fewer parsed questions reject the prompt (ours)."""
    max_questions: int = 10
    """More parsed questions reject the prompt (ours: a runaway decomposition)."""
    tau: float = 0.6
    """Drop a pair when S(y_w) < tau (OSPO sec. 3.6: 0.6). S is in [-1, 1]."""
    filter: bool = True
    """Master switch for both filter rules (ablation: OSPO sec. 5.1)."""
    min_chosen_score: bool = True
    """Rule 1: drop pairs whose chosen image scores S(y_w) < tau (OSPO sec. 3.6)."""
    drop_all_true_rejected: bool = True
    """Rule 2: drop pairs whose rejected image answers yes (s_j > 0) to every question: a
    preference-false pair (OSPO sec. 3.6)."""
    select: Literal["best", "random", "all"] = "best"
    """Keep the surviving pair with the highest S(y_w) (OSPO sec. 3.6), a random one, or all."""
    batch_size: int = 32
    """Image-question rows per forward (ours)."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    """Decomposition decoding: greedy (ours: questions should be faithful, not diverse)."""

    def __post_init__(self):
        _check(-1.0 <= self.tau <= 1.0, "vqa.tau", f"must be in [-1, 1] (S is a difference of probabilities), got {self.tau}")
        _check(self.min_questions >= 1, "vqa.min_questions", "must be >= 1")
        _check(self.max_questions >= self.min_questions, "vqa.max_questions", "must be >= vqa.min_questions")
        _check(self.batch_size >= 1, "vqa.batch_size", "must be >= 1")


@dataclass(config=_STRICT)
class TrainConfig:
    loss: Literal["obj_simpo", "simpo", "sft"] = "obj_simpo"
    """``obj_simpo`` (OSPO sec. 3.7), ``simpo`` (alpha = 0), or ``sft`` only (ablation sec. 5.1).
    The paper's loss ablations: plain SimPO = ``loss=simpo sft_weight=0``; weighted SimPO =
    ``loss=obj_simpo sft_weight=0``; SFT on/off = ``sft_weight`` 2 / 0."""
    variant: Literal["paper", "normalized"] = "paper"
    """``paper``: r = (1/|y|) sum_t beta (1 + alpha m_t) log p (OSPO sec. 3.7). ``normalized``:
    the public code's r = beta sum_t w_t log p / sum_t w_t, with smoothed masks. Its preset
    (the public code's values): ``train.variant=normalized train.beta=5 train.gamma=2.5
    train.mask_smoothing=1.0``. See :mod:`ospo.losses`."""
    alpha: float = 1.0
    """Object-token weight (OSPO sec. 3.7: 1)."""
    beta: float = 0.5
    """Reward scale (OSPO sec. 3.7: 0.5). The public code's normalized variant uses 5."""
    gamma: float = 0.25
    """Target reward margin. The paper gives none; SimPO recommends gamma/beta in [0.3, 1] and
    the public code uses gamma/beta = 0.5, so 0.5 * beta = 0.25 (ours)."""
    sft_weight: float = 2.0
    """lambda on the SFT term (mean NLL of y_w) (OSPO sec. 3.7: 2). 0 turns SFT off."""
    sft_uncond_weight: float = 0.0
    """Weight on a second SFT term: the NLL of y_w under the unconditional prompt (pad
    everywhere but BOS and ``<begin_of_image>``, the row classifier-free guidance samples
    from). Ours, not the paper's (0 = the paper's loss): the paper's terms train the
    conditional rows only, so CFG's ``uncond + s (cond - uncond)`` extrapolates every change
    s times; this keeps the unconditional distribution moving with the conditional one, as
    Janus's pretraining does with its unconditional rows. A diagnostic (README, ShapesWorld)."""
    mask_smoothing: float = 0.0
    """Gaussian sigma (in tokens) applied to masks before use; the normalized preset uses 1.0
    (public code smooths masks). 0 keeps the binary masks (paper)."""
    learning_rate: float = 1e-5
    """Public code: AdamW lr 1e-5, cosine to ``min_learning_rate``."""
    min_learning_rate: float = 1e-7
    warmup_ratio: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    micro_batch_size: int = 16
    """Pairs per device per micro-step (public code: 16)."""
    grad_accum: int = 2
    """Public code: 2 (x 16 x 8 GPUs = 256 pairs per step)."""
    max_steps: int = 1000
    """Optimizer steps (public code: 1000); fewer when the data runs out of epochs."""
    epochs: float = 1000.0
    """Upper bound on passes over pairs.jsonl; training stops at whichever comes first."""
    grad_clip: float = 1.0
    """Max global gradient norm (public code: 1.0); 0 disables clipping."""
    gradient_checkpointing: bool = True
    """Recompute the language model's layers in backward (public code: on). Saves activation
    memory on GPU; costs ~30-50% more time per step (bench/bench_train.py)."""
    bf16: Literal["auto", "true", "false"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU. Plain torch trains fp32 master weights under bf16
    autocast; DeepSpeed takes its ``bf16`` section (``"auto"`` filled from this)."""
    lora: bool = False
    """Full fine-tuning by default; LoRA via PEFT on the language model's projections
    (public code: r 64, alpha 128), merged into the weights when saved."""
    lora_r: int = 64
    lora_alpha: int = 128
    deepspeed: str | None = None
    """A DeepSpeed JSON (``configs/deepspeed/zero2.json`` / ``zero3.json``; relative to the config
    file, the working directory or the package's ``configs/``) or None for plain torch. Its
    ``"auto"`` values (micro batch, accumulation, clipping, bf16) are filled from these fields.
    A single process without a launcher runs as rank 0 of a 1-rank group (gloo on CPU)."""
    log_every: int = 1
    """Append a train_log.jsonl record every this many optimizer steps (and at the last)."""
    save_every: int = 0
    """Save resumable training state (``train_state/``: weights, optimizer, scheduler, step,
    RNG) every this many steps; 0: never, a killed run restarts from step 0. The final
    result is always ``checkpoint/``."""

    def __post_init__(self):
        _check(self.beta > 0, "train.beta", "must be > 0")
        _check(self.alpha >= 0, "train.alpha", "must be >= 0")
        _check(self.sft_weight >= 0, "train.sft_weight", "must be >= 0")
        _check(self.sft_uncond_weight >= 0, "train.sft_uncond_weight", "must be >= 0")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        for k in ("micro_batch_size", "grad_accum", "max_steps", "lora_r", "log_every"):
            _check(getattr(self, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.mask_smoothing >= 0, "train.mask_smoothing", "must be >= 0")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(0 <= self.min_learning_rate <= self.learning_rate, "train.min_learning_rate",
               "must be in [0, train.learning_rate]")


@dataclass(config=_STRICT)
class Config:
    schema_version: int = SCHEMA_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    vqa: VqaConfig = field(default_factory=VqaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _check(self.schema_version == SCHEMA_VERSION, "schema_version",
               f"this ospo reads schema {SCHEMA_VERSION}, the file says {self.schema_version}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stage_view(self, stage: str) -> dict[str, Any]:
        """The keys a stage's outputs depend on (hashed into its manifest)."""
        d = self.to_dict()
        return {"model.path": d["model"]["path"], "run.seed": d["run"]["seed"],
                **{f"{stage}.{k}": v for k, v in d[stage].items()}}


def config_hash(view: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value (e.g. perturb.num_variants=2)")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def _known_keys(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _check_keys(d: dict, cls, prefix: str = "") -> None:
    """Name unknown keys with their full dotted path (pydantic would name only the leaf)."""
    known = _known_keys(cls)
    for k, v in d.items():
        path = f"{prefix}{k}"
        if k not in known:
            raise ConfigError(f"{path}: unknown key; known keys here: {sorted(known)}")
        ftype = {f.name: f for f in fields(cls)}[k]
        sub = ftype.default_factory() if callable(getattr(ftype, "default_factory", None)) else None
        if is_dataclass(sub) and not isinstance(sub, type):
            if not isinstance(v, dict):
                raise ConfigError(f"{path}: must be a section (mapping), got {v!r}")
            _check_keys(v, type(sub), path + ".")


def build(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    _check_keys(data, Config)
    sections = {}
    for name in ("model", "run", "prompts", "perturb", "images", "vqa", "train"):
        cls = {f.name: f for f in fields(Config)}[name].default_factory
        try:
            sections[name] = cls(**data.get(name, {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"{name}.{loc}: {err['msg']} (got {err.get('input')!r})") from None
    return Config(schema_version=data.get("schema_version", SCHEMA_VERSION), **sections)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply key=value overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config file is a mapping of sections")
        data = _resolve_inputs(loaded, p.parent)
    return build(data, overrides)


INPUT_KEYS = (("prompts", "input"), ("prompts", "seed_examples"), ("perturb", "input"), ("vqa", "input"), ("train", "deepspeed"))


def _resolve_inputs(data: dict, base: Path) -> dict:
    """File paths written in a config file are relative to that file (command-line
    overrides stay relative to the working directory)."""
    for section, key in INPUT_KEYS:
        val = (data.get(section) or {}).get(key)
        if isinstance(val, str) and not Path(val).is_absolute() and (base / val).exists():
            data[section][key] = str((base / val).resolve())
    return data


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
