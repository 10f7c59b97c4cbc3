"""One typed config tree: defaults < YAML < ``key.sub=value`` overrides, strict keys.

One file over 400 lines on purpose: every section, its defaults and its checks read in one place,
next to the YAML files they validate (the MoE routing and balancing fields live with the layer,
``deepsuite/layers/moe/options.py``, and are inherited here).

OmegaConf structured configs do the merge and the type checks (unknown keys and wrong types are
rejected with the full dotted key); each dataclass validates its own values in ``__post_init__``
and :meth:`Config.validate` checks the relations between sections. Every error is a
:class:`ConfigError` whose message names the field and what is allowed.

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "moe.n_routed_experts=16"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepsuite.errors import ConfigError
from deepsuite.layers.moe.balance import GammaSchedule
from deepsuite.layers.moe.options import BalanceOptions, RoutingOptions, balance_of, routing_of

__all__ = [
    "Config",
    "ConfigError",  # defined in deepsuite.errors (one base class for every user-facing error)
    "ModelArgs",
    "config_from_dict",
    "expert_parallel_sizes",
    "load_config",
    "validate_expert_parallel",
]


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, f"{section}.{name}", "a positive number", value)


def _non_negative(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value >= 0, f"{section}.{name}", "a number >= 0", value)


def _one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
    _check(value in allowed, key, f"one of {list(allowed)}", value)


@dataclass
class AuxHeadConfig:
    """An auxiliary head: a stack of ``deepsuite.layers`` / ``torch.nn`` modules on the hidden
    states after block ``layer``, trained to predict the token at ``offset`` from each position
    (1 = the next token, 2 = the one after, 0 = the current one), with loss weight ``weight``.

    ``modules`` items are ``{type: ClassName, args: {...}}``; an argument written ``"@dim"`` or
    ``"@vocab"`` is replaced by the model dim or the vocabulary size when the model is built.
    """

    name: str = MISSING
    layer: int = -1
    modules: list[dict[str, Any]] = field(default_factory=list)
    target: str = "token"
    offset: int = 1
    loss: str = "cross_entropy"
    weight: float = 0.1

    def __post_init__(self) -> None:
        key = f"model.aux_heads[{self.name}]"
        _check(
            self.name.isidentifier(),
            f"{key}.name",
            "an identifier (used in metric keys)",
            self.name,
        )
        _check(
            bool(self.modules), f"{key}.modules", "at least one {type, args} module", self.modules
        )
        for i, m in enumerate(self.modules):
            _check(
                isinstance(m, dict)
                and isinstance(m.get("type"), str)
                and set(m) <= {"type", "args"},
                f"{key}.modules[{i}]",
                "a mapping with 'type' (a class name) and optional 'args'",
                m,
            )
        _one_of(f"{key}.target", self.target, ["token"])
        _one_of(f"{key}.loss", self.loss, ["cross_entropy"])
        _non_negative("model.aux_heads", self, "weight")


@dataclass
class ModelConfig:
    """Decoder shape. ``n_dense_layers`` leading blocks use a dense SwiGLU, the rest DeepSeekMoE."""

    vocab_size: int = 0  # 0 = the tokenizer's vocabulary size
    dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1
    n_heads: int = 4
    inter_dim: int = 512
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    aux_heads: list[AuxHeadConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        _positive("model", self, "dim", "n_layers", "n_heads", "inter_dim")
        names = [h.name for h in self.aux_heads]
        _check(len(set(names)) == len(names), "model.aux_heads", "unique names", names)
        for h in self.aux_heads:
            _check(
                -self.n_layers <= h.layer < self.n_layers,
                f"model.aux_heads[{h.name}].layer",
                f"a block index in [-{self.n_layers}, {self.n_layers})",
                h.layer,
            )
        _non_negative("model", self, "vocab_size")
        _positive("model", self, "max_seq_len", "norm_eps", "init_std")
        _non_negative("model", self, "n_dense_layers", "mtp_depth", "mtp_loss_weight")
        _check(
            self.n_dense_layers <= self.n_layers,
            "model.n_dense_layers",
            f"at most model.n_layers ({self.n_layers})",
            self.n_dense_layers,
        )


@dataclass
class MLAConfig:
    """Multi-head latent attention dims (DeepSeek names) and rotary scaling."""

    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    rope_interleave: bool = True  # interleaved pairs (DeepSeek); False = rotate-half

    def __post_init__(self) -> None:
        _non_negative("mla", self, "q_lora_rank")
        _positive("mla", self, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        _positive("mla", self, "rope_theta", "rope_factor", "original_max_seq_len")
        _check(
            self.qk_rope_head_dim % 2 == 0,
            "mla.qk_rope_head_dim",
            "an even number",
            self.qk_rope_head_dim,
        )
        _one_of("mla.rope_scaling", self.rope_scaling, ["none", "linear", "dynamic", "yarn"])

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """The scaling arguments in the Hugging Face ``rope_scaling`` form, or None."""
        if self.rope_scaling == "none":
            return None
        out: dict[str, Any] = {"type": self.rope_scaling, "factor": self.rope_factor}
        if self.rope_scaling in ("yarn", "dynamic"):
            out["original_max_position_embeddings"] = self.original_max_seq_len
        if self.rope_scaling == "yarn":
            out.update(
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
                mscale=self.mscale,
                mscale_all_dim=self.mscale_all_dim,
            )
        return out


@dataclass
class MoESizes:
    """The sizes of every DeepSeekMoE layer (the ``moe`` section's first fields)."""

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_expert_per_token: int = 2
    expert_intermediate_size: int = 128


@dataclass
class MoEConfig(BalanceOptions, RoutingOptions, MoESizes):
    """DeepSeekMoE: the sizes, how tokens are routed and how load is balanced.

    The routing and balancing fields, their defaults and their checks are the layer's own
    (:class:`~deepsuite.layers.moe.RoutingOptions`, :class:`~deepsuite.layers.moe.BalanceOptions`;
    the formulas are in docs/formulas.md); this section adds when the bias stops moving.
    """

    bias_update_until_tokens: int = 0  # gamma becomes 0 after this many tokens (0: never)

    def __post_init__(self) -> None:
        _positive("moe", self, "n_routed_experts", "n_expert_per_token")
        _positive("moe", self, "expert_intermediate_size")
        _non_negative("moe", self, "n_shared_experts", "bias_update_until_tokens")
        if self.top_p is None:
            self.top_p = 0.0  # "off", as RoutingOptions spells it
        try:
            self.check_routing("moe.")
            self.check_experts(self.n_routed_experts, self.n_expert_per_token, "moe.")
            self.check_balance("moe.")
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def routing(self) -> RoutingOptions:
        """This section's routing fields, as the layer takes them."""
        return routing_of(self)

    def balance(self) -> BalanceOptions:
        """This section's balancing fields, as the layer takes them."""
        return balance_of(self)

    def gamma_schedule(self) -> GammaSchedule:
        """The bias update speed over training (``bias_update_speed``, 0 after the limit)."""
        return GammaSchedule(self.bias_update_speed, self.bias_update_until_tokens or None)


def expert_parallel_sizes(n_routed_experts: int, world_size: int | None = None) -> list[int]:
    """The expert-parallel sizes that split ``n_routed_experts`` (and ``world_size``) evenly."""
    top = n_routed_experts if world_size is None else min(n_routed_experts, world_size)
    return [
        d
        for d in range(1, top + 1)
        if n_routed_experts % d == 0 and (world_size is None or world_size % d == 0)
    ]


def validate_expert_parallel(n_routed_experts: int, world_size: int | None, ep: int) -> None:
    """The expert-parallel rule, the one place it is written: each of the ``ep`` ranks of an EP
    group holds ``n_routed_experts / ep`` whole experts, and the world is whole EP groups.

    ``world_size=None`` checks the experts only (the config alone, before a launch). Pure: it runs
    before any collective, so every rank fails the same way at once. Raises :class:`ConfigError`
    (a ValueError) naming ``parallel.ep`` and the sizes that would work.
    """
    sizes = (("n_routed_experts", n_routed_experts), ("world_size", world_size or 1))
    for name, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"parallel.ep: expected a positive int, got {ep!r}")
    E = n_routed_experts
    if ep > E:
        raise ConfigError(
            f"parallel.ep={ep} exceeds moe.n_routed_experts={E}: every expert-parallel rank "
            f"needs at least one expert; use ep <= {E}"
        )
    ok = expert_parallel_sizes(E, world_size)
    if E % ep:
        raise ConfigError(
            f"parallel.ep: expected a divisor of moe.n_routed_experts ({E}), got {ep}: "
            f"moe.n_routed_experts={E} is not divisible by parallel.ep={ep}; choose ep from "
            f"{ok} or make moe.n_routed_experts a multiple of {ep}"
        )
    if world_size is not None and world_size % ep:
        raise ConfigError(
            f"parallel.ep: expected a divisor of the world size ({world_size}), got {ep}: "
            f"world size {world_size} is not divisible by parallel.ep={ep}; launch a multiple "
            f"of {ep} ranks or choose ep from {ok}"
        )


@dataclass
class ParallelConfig:
    """Expert parallelism and the DeepSpeed engine settings."""

    ep: int = 1
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    zero_stage: int = -1
    backend: str = "auto"
    limit_groups_to: str = "experts"
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _positive("parallel", self, "ep", "collective_timeout_s")
        _one_of("parallel.zero_stage", self.zero_stage, [-1, 0, 1, 2, 3])
        _one_of("parallel.backend", self.backend, ["auto", "gloo", "nccl"])
        _one_of("parallel.limit_groups_to", self.limit_groups_to, ["experts", "ranks", "nodes"])


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing. ``source: builtin`` is the interpreter's own docs and sources."""

    source: str = "builtin"
    builtin_parts: list[str] = field(default_factory=lambda: ["docs", "source"])
    text_field: str = "text"
    # how a .txt file splits into documents: "blank_line" (a blank line ends one), "line" (one
    # per line) or "file" (the whole file is one document); other formats have one per record
    document_separator: str = "blank_line"
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.02
    streaming: bool = False
    max_documents: int = 0
    num_proc: int = 1
    seed: int = 0
    cache_dir: str = ""
    # packed documents attend only within themselves and their positions restart at each one
    # (Megatron's --reset-attention-mask --reset-position-ids); off: plain causal over the row
    document_masking: bool = False
    # "text": every token of every document is a target (pre-training); "sft": json/jsonl records
    # of prompt/completion or chat messages, the loss on completion (assistant) tokens only
    format: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"

    def __post_init__(self) -> None:
        _one_of("data.format", self.format, ["text", "sft"])
        for name in ("text_field", "prompt_field", "completion_field", "messages_field"):
            _check(bool(getattr(self, name)), f"data.{name}", "a column name", getattr(self, name))
        _positive("data", self, "seq_len", "bpe_vocab_size", "num_proc")
        _non_negative("data", self, "max_documents")
        _check(
            0.0 <= self.val_fraction < 1.0,
            "data.val_fraction",
            "a value in [0, 1)",
            self.val_fraction,
        )
        _check(
            bool(self.source),
            "data.source",
            "'builtin', a local path or a dataset name",
            self.source,
        )
        for part in self.builtin_parts:
            _one_of("data.builtin_parts[]", part, ["docs", "source"])
        _one_of("data.document_separator", self.document_separator, ["blank_line", "line", "file"])


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _positive("optim", self, "lr", "eps")
        _non_negative("optim", self, "weight_decay", "warmup_steps", "grad_clip")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            "optim.min_lr_ratio",
            "a value in [0, 1]",
            self.min_lr_ratio,
        )
        _check(0.0 <= self.beta1 < 1.0, "optim.beta1", "a value in [0, 1)", self.beta1)
        _check(0.0 <= self.beta2 < 1.0, "optim.beta2", "a value in [0, 1)", self.beta2)
        _one_of("optim.schedule", self.schedule, ["cosine", "constant", "linear"])


@dataclass
class TrainConfig:
    """Steps are optimizer steps; a step sees ``global_batch_size`` sequences over all ranks."""

    steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 16
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 3
    run_dir: str = "runs/default"
    resume: str = "auto"
    stop_at_step: int = 0  # end this invocation (with a checkpoint) at this step; 0 = train.steps
    export_final: bool = (
        True  # write <run_dir>/final/model.safetensors (experts gathered) at the end
    )
    # "full": keep only each block's input, recompute the block (all-to-all included) in backward
    activation_checkpointing: str = "none"
    # start from these weights (a Hugging Face DeepSeek-V2/V3 directory, a deepsuite export or
    # run): the architecture keys left at their default are taken from it, the others must match;
    # read only when the run has no checkpoint of its own to resume
    init_from: str = ""
    # torch.compile each transformer block (deepsuite.training.compile.apply_compile); the
    # backend "inductor" generates kernels, "aot_eager" only traces (a quick check of the graphs)
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        _positive("train", self, "steps", "micro_batch_size", "global_batch_size", "keep_last")
        _non_negative("train", self, "eval_every", "eval_batches", "save_every", "stop_at_step")
        _one_of("train.precision", self.precision, ["fp32", "bf16"])
        _one_of("train.activation_checkpointing", self.activation_checkpointing, ["none", "full"])
        _one_of("train.compile_backend", self.compile_backend, ["inductor", "aot_eager"])
        _check(
            self.resume in ("auto", "never") or bool(self.resume),
            "train.resume",
            "'auto', 'never' or a checkpoint directory",
            self.resume,
        )


@dataclass
class LoggingConfig:
    """Where metrics go: jsonl always, console on rank 0, wandb when ``wandb`` is not disabled."""

    wandb: str = "disabled"
    project: str = "deepsuite"
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    console: bool = True
    log_every: int = 1
    moe_every: int = 10
    # MoE window: window MaxVio, dead experts and per-expert load sum the last
    # max(moe_window, moe_every) steps, so consecutive MoE logs leave no step out
    moe_window: int = 10
    # wandb only: the load and bias heatmaps (drawn from the jsonl on rank 0, ~0.1 s per
    # picture) every this many steps and at the last step; 0 = at the last step only
    images_every: int = 100
    # wandb only: per-expert series moe/layerL/expert/EE/{load_share,bias} are logged while
    # 2 x MoE layers x experts stays within this (W&B advises < 10,000 metrics per project)
    expert_series_max: int = 4096
    # alerts (console line + wandb.alert), once per onset, none before alert_after_steps:
    alert_dead_steps: int = 100  # an expert without a token for this many steps; 0 = off
    alert_max_vio: float = 1.0  # a layer's window MaxVio above this; 0 = off
    alert_after_steps: int = 500  # warm-up: the bias needs gamma x steps to reach its spread
    peak_tflops: float = (
        0.0  # per device, for perf/mfu (e.g. 989 for H100 SXM bf16); 0 = not logged
    )

    def __post_init__(self) -> None:
        _one_of("logging.wandb", self.wandb, ["disabled", "offline", "online"])
        _positive("logging", self, "log_every", "moe_every", "moe_window")
        _non_negative(
            "logging",
            self,
            "peak_tflops",
            "images_every",
            "expert_series_max",
            "alert_dead_steps",
            "alert_max_vio",
            "alert_after_steps",
        )

    @property
    def moe_window_steps(self) -> int:
        """The MoE metrics window in steps: max(moe_window, moe_every)."""
        return max(self.moe_window, self.moe_every)


@dataclass
class ModelArgs:
    """The sections that define a model's architecture: all ``DeepSeekLM`` takes (and keeps).

    A :class:`Config` is a ModelArgs plus how to train it, so ``DeepSeekLM(cfg)`` works; the
    model copies out these three sections only.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class Config(ModelArgs):
    """The whole tree. Sections validate themselves; :meth:`validate` checks cross-section rules."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = MISSING

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"at most model.max_seq_len ({self.model.max_seq_len})",
            self.data.seq_len,
        )
        _check(
            self.model.n_dense_layers < self.model.n_layers or self.parallel.ep == 1,
            "parallel.ep",
            "1 when every layer is dense (model.n_dense_layers == model.n_layers)",
            self.parallel.ep,
        )
        validate_expert_parallel(self.moe.n_routed_experts, None, self.parallel.ep)
        _check(
            self.train.global_batch_size % self.train.micro_batch_size == 0,
            "train.global_batch_size",
            f"a multiple of train.micro_batch_size ({self.train.micro_batch_size})",
            self.train.global_batch_size,
        )

    def check_world(self, world_size: int) -> None:
        """Rules that need the world size; called on every rank before any collective."""
        per_step = self.train.micro_batch_size * world_size
        _check(
            self.train.global_batch_size % per_step == 0,
            "train.global_batch_size",
            f"a multiple of train.micro_batch_size x world size ({self.train.micro_batch_size} x "
            f"{world_size} = {per_step}); change the batch sizes or the number of ranks",
            self.train.global_batch_size,
        )
        validate_expert_parallel(self.moe.n_routed_experts, world_size, self.parallel.ep)

    def grad_accumulation_steps(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _clean_message(err: OmegaConfBaseException) -> str:
    """OmegaConf messages carry a multi-line trailer; keep the reason and the dotted key."""
    text = str(err).strip().splitlines()
    reason = text[0] if text else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {reason}" if key else reason


def _yaml_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML mappings to merge, base first: a file may name another in ``extends:`` (a path
    relative to itself) and override only what differs."""
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        raise ConfigError(
            f"config file {path}: {what}; expected a YAML file such as configs/tiny.yaml"
        )
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {[str(p) for p in seen]}")
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    data.setdefault("name", path.stem)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a path to another YAML file, got {base!r}")
    return [*_yaml_chain(path.parent / base, (*seen, path.resolve())), (path, data)]


def _read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a file, a syntax error naming the file, line and column."""
    try:
        with path.open(encoding="utf-8") as f:  # a stream, so YAML's marks carry the file name
            return yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(
            str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p
        )
        raise ConfigError(f"{path}{where}: invalid YAML: {what or err}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from defaults, a YAML file (``yaml.safe_load``; it may ``extends:``
    another) and dotted overrides.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types and bad values.
    """
    layers: list[tuple[str, Any]] = []  # (where it came from, its mapping), base first
    if path is not None:
        chain = _yaml_chain(Path(path), seen=())
        layers += [(str(source), data) for source, data in chain]
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected the form key.sub=value")
        try:  # each on its own, so a value YAML cannot parse is named
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: cannot parse the value ({problem})") from None
    merged = OmegaConf.structured(Config)
    try:
        for source, data in layers:  # one at a time, so an error names the file it is in
            try:
                merged = OmegaConf.merge(merged, data)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{source}: {_clean_message(err)}") from None
        if OmegaConf.is_missing(merged, "name"):
            merged.name = "default"
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_clean_message(err)) from None
    assert isinstance(cfg, Config)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from :meth:`Config.to_dict` output (e.g. the copy saved in a checkpoint)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_clean_message(err)) from None
    assert isinstance(cfg, Config)
    return cfg
