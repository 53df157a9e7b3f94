"""Frozen configuration dataclasses for models and training, with JSON round-trip and presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, TypeVar

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
NORMS = ("layernorm", "rmsnorm")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name}={value!r} must be >= 0")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT vision tower; CLIP/SigLIP/BLIP-2 variants differ only in these switches."""

    image_size: int = 48
    patch_size: int = 16
    num_channels: int = 3
    width: int = 128
    depth: int = 3
    num_heads: int = 4
    mlp_dim: int = 256
    act: str = "gelu"
    norm_eps: float = 1e-5
    patch_bias: bool = True  # CLIP's patch conv has no bias; SigLIP/BLIP-2's has one
    qkv_bias: bool = True
    use_cls_token: bool = False
    pre_norm: bool = False  # CLIP's `pre_layrnorm` after the embeddings
    final_norm: bool = True  # applied only when the last layer's features are used
    # Index into the hidden states [embeddings, block_0, ..., block_{L-1}] as HF counts them
    # (LLaVA uses -2); blocks after it are never computed.
    feature_layer: int = -1
    drop_cls_token: bool = True  # drop the CLS token from the features handed to the connector
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_channels", "width", "depth", "num_heads", "mlp_dim"):
            _check_positive(f"vision.{name}", getattr(self, name))
        _check_choice("vision.act", self.act, ACTIVATIONS)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} is not divisible by vision.patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"vision.width={self.width} is not divisible by vision.num_heads={self.num_heads}")
        if not -(self.depth + 1) <= self.feature_layer < self.depth + 1:
            raise ValueError(
                f"vision.feature_layer={self.feature_layer} is out of range for depth={self.depth}"
            )

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (without the CLS token)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def blocks_used(self) -> int:
        """How many blocks run to reach `feature_layer`."""
        return self.feature_layer % (self.depth + 1)

    @property
    def num_features(self) -> int:
        """Tokens per image handed to the connector."""
        return self.num_patches + int(self.use_cls_token and not self.drop_cls_token)


CONNECTORS = ("mlp", "qformer")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Vision → language connector: a LLaVA MLP projector or a BLIP-2 / InstructBLIP Q-Former.

    The Q-Former fields are used only when `kind == "qformer"`; its output goes through a linear
    projection to the language width (HF `language_projection`), which belongs to the connector.
    """

    kind: str = "mlp"
    hidden_dim: int = 256  # mlp: hidden width
    act: str = "gelu"
    num_query_tokens: int = 32
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_frequency: int = 2  # a cross-attention to the image every N layers (layer i: i % N == 0)
    norm_eps: float = 1e-12
    reads_text: bool = False  # InstructBLIP: the queries also attend to the instruction tokens
    text_vocab_size: int = 30522  # the Q-Former's own (BERT) vocabulary, when it reads text
    text_max_positions: int = 512
    text_pad_id: int = 0

    def __post_init__(self) -> None:
        _check_choice("connector.kind", self.kind, CONNECTORS)
        _check_positive("connector.hidden_dim", self.hidden_dim)
        _check_choice("connector.act", self.act, ACTIVATIONS)
        if self.kind == "qformer":
            for name in ("num_query_tokens", "width", "depth", "num_heads", "mlp_dim", "cross_attention_frequency"):
                _check_positive(f"connector.{name}", getattr(self, name))
            if self.width % self.num_heads:
                raise ValueError(
                    f"connector.width={self.width} is not divisible by connector.num_heads={self.num_heads}"
                )


LANGUAGE_ARCHS = ("llama", "opt", "t5")


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """Language model: a Llama-style decoder (RMSNorm, rotary, SwiGLU, GQA), OPT, or T5 (`arch`).

    OPT: LayerNorm, learned absolute positions, ReLU MLP. T5: encoder–decoder, RMSNorm, relative
    position bias, gated-GELU (v1.1) or ReLU MLP; `depth` counts the encoder's blocks.
    """

    arch: str = "llama"
    vocab_size: int = 128
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 512
    act: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention_bias: bool = False  # opt: HF `enable_bias`, which also puts biases on the MLP
    tie_embeddings: bool = False  # t5: tied head with HF's d_model**-0.5 scaling of the decoder output
    max_seq_len: int = 256  # opt: rows of the learned position table (HF `max_position_embeddings`)
    gated_mlp: bool | None = None  # None: the arch's own (llama, t5: gated; opt: not)
    decoder_depth: int | None = None  # t5: decoder blocks (None: as many as the encoder's `depth`)
    relative_buckets: int = 32  # t5: relative position buckets
    relative_max_distance: int = 128  # t5: relative distance from which all positions share a bucket
    decoder_start_id: int = 0  # t5: the decoder's first input token (HF `decoder_start_token_id`)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len",
                     "relative_buckets", "relative_max_distance"):
            _check_positive(f"language.{name}", getattr(self, name))
        _check_choice("language.arch", self.arch, LANGUAGE_ARCHS)
        _check_choice("language.act", self.act, ACTIVATIONS)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"language.num_heads={self.num_heads} is not a multiple of "
                f"language.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.width % self.num_heads:
            raise ValueError(f"language.width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.arch != "llama" and self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"language.num_kv_heads={self.num_kv_heads} must equal language.num_heads={self.num_heads} "
                f"for arch={self.arch!r} (no grouped-query attention)"
            )
        if self.decoder_depth is not None:
            if self.arch != "t5":
                raise ValueError(f"language.decoder_depth is for arch='t5' only, not {self.arch!r}")
            _check_positive("language.decoder_depth", self.decoder_depth)

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width."""
        return self.head_dim if self.head_dim is not None else self.width // self.num_heads

    @property
    def norm(self) -> str:
        """Norm kind of the blocks and the final norm."""
        return "layernorm" if self.arch == "opt" else "rmsnorm"

    @property
    def resolved_gated_mlp(self) -> bool:
        """Whether the MLP is gated (`down(act(gate x) * up x)`)."""
        return self.gated_mlp if self.gated_mlp is not None else self.arch != "opt"

    @property
    def num_decoder_layers(self) -> int:
        """Blocks of the (KV-cached) decoder."""
        return self.decoder_depth or self.depth


FAMILIES = ("llava", "blip2", "instructblip")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """A LLaVA-style VLM: vision tower, connector, language model."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    connector: ConnectorConfig = dataclasses.field(default_factory=ConnectorConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    family: str = "llava"
    # Where image tokens go: None puts them before the text (the built-in model); an id makes
    # them replace, in order, the prompt positions holding that token (HF LLaVA / BLIP-2 / InstructBLIP).
    image_token_id: int | None = None

    def __post_init__(self) -> None:
        _check_choice("family", self.family, FAMILIES)
        if self.family != "llava" and self.connector.kind != "qformer":
            raise ValueError(f"family={self.family!r} needs a qformer connector, not {self.connector.kind!r}")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens handed to the language model per image."""
        if self.connector.kind == "qformer":
            return self.connector.num_query_tokens
        return self.vision.num_features

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VLMConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        return cls(
            vision=_from_dict(VisionConfig, data.get("vision", {})),
            connector=_from_dict(ConnectorConfig, data.get("connector", {})),
            language=_from_dict(LanguageConfig, data.get("language", {})),
            **{k: v for k, v in data.items() if k not in ("vision", "connector", "language")},
        )

    def to_json(self) -> str:
        """Pretty JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the default model on built-in shapes VQA."""

    steps: int = 3000
    batch_size: int = 64
    # 1e-3 and above stall on a language-prior plateau (constant answer per question type)
    learning_rate: float = 3e-4
    end_learning_rate: float = 1e-5
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    train_images: int = 12000
    vision_steps: int = 300  # stage 1: per-cell attribute pretraining of the vision tower (0: off)
    vision_batch_size: int = 128
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # save the train state every N steps to OUT-checkpoints, to resume (0: off)
    skip_nonfinite: int = 0  # skip up to N steps with a non-finite loss or gradient (0: stop at the first)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "train_images"):
            _check_positive(name, getattr(self, name))
        for name in ("vision_steps", "eval_every", "checkpoint_every", "skip_nonfinite", "seed"):
            _check_non_negative(name, getattr(self, name))
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
    """Restoring a pruned model with LoRA / SparseLoRA and dense-teacher distillation."""

    method: str = "sparselora"  # lora: W⊙M + s·BA (dense once merged); sparselora: (W + s·BA)⊙M
    steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1  # optimizer step every N micro-batches (effective batch = batch_size · N)
    learning_rate: float = 1e-3
    end_learning_rate: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 0.1  # λ: loss = (1 − λ)·CE + λ·KL(teacher ‖ student); paper: 0.1
    temperature: float = 1.0  # T of the KL softmaxes; paper: 1
    vision_rank: int = 4
    connector_rank: int = 2
    language_rank: int = 8
    alpha: float = 16.0
    train_data: str = "shapes-mix"
    train_images: int = 2000
    bf16: bool = False
    checkpoint_every: int = 0  # save LoRA + optimizer + data state every N steps to resume from (0: only at the end)
    skip_nonfinite: int = 0  # skip up to N steps with a non-finite loss or gradient (0: stop at the first)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, ("lora", "sparselora"))
        for name in ("steps", "batch_size", "grad_accum", "train_images", "vision_rank", "connector_rank",
                     "language_rank"):
            _check_positive(name, getattr(self, name))
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight={self.kl_weight} must be in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        for name in ("checkpoint_every", "skip_nonfinite", "seed", "weight_decay"):
            _check_non_negative(name, getattr(self, name))
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")


T = TypeVar("T")


def _from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def default_vlm_config(vocab_size: int) -> VLMConfig:
    """The built-in default tiny VLM, sized for shapes VQA on a laptop CPU."""
    return VLMConfig(
        vision=VisionConfig(),
        connector=ConnectorConfig(hidden_dim=128),
        language=LanguageConfig(
            vocab_size=vocab_size, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384
        ),
    )
