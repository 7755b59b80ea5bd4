"""KimiLinearConfig: the model's hyper-parameters, read from and written to the released
checkpoint's config.json (docs/kimi_linear_model.md), plus named presets.

Layer indices are 0-based inside this class. The released file gives them 1-based inside
`linear_attn_config` (`kda_layers`, `full_attn_layers`); a `layer_types` list, when present, takes
precedence. Keys this class does not model are kept in `extra` and written back unchanged.

The KDA gate is the released checkpoint's softplus form unless `linear_attn_config` holds a
`gate_lower_bound` L (kda_gate_lower_bound here), which selects the bounded form
L·sigmoid(exp(A_log)·(z + dt_bias)) of docs/kda_math.md §2.
"""

import copy
import json
import math
import os
from dataclasses import dataclass, field, fields

KDA_LAYER_TYPES = ("kda", "linear_attention")
MLA_LAYER_TYPES = ("mla", "full_attention", "attention")


@dataclass
class KimiLinearConfig:
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_max_length: int = 1048576
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    pad_token_id: int | None = 163839
    # Layer kinds, 0-based.
    kda_layers: list[int] = field(default_factory=list)
    full_attn_layers: list[int] = field(default_factory=lambda: [3, 7, 11, 15, 19, 23, 26])
    # KDA (linear_attn_config).
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4
    kda_gate_lower_bound: float | None = None  # None: the softplus gate; L < 0: the bounded gate
    # MLA.
    num_attention_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    mla_kv_norm_eps: float = 1e-6
    # Dense MLP and MoE.
    intermediate_size: int = 9216
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    moe_router_activation_func: str = "sigmoid"
    moe_renormalize: bool = True
    routed_scaling_factor: float = 2.446
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kda_layers:
            self.kda_layers = [i for i in range(self.num_hidden_layers) if i not in self.full_attn_layers]
        self.validate()

    # ------------------------------------------------------------------ checks and derived
    def validate(self) -> None:
        kda, mla = set(self.kda_layers), set(self.full_attn_layers)
        every = set(range(self.num_hidden_layers))
        if kda & mla:
            raise ValueError(f"KimiLinearConfig: layers {sorted(kda & mla)} are both KDA and MLA")
        if kda | mla != every:
            raise ValueError(
                f"KimiLinearConfig: kda_layers and full_attn_layers must cover layers 0..{self.num_hidden_layers - 1} "
                f"exactly; missing {sorted(every - kda - mla)}, out of range {sorted((kda | mla) - every)}"
            )
        bound = self.kda_gate_lower_bound
        if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound < 0):
            raise ValueError(
                f"KimiLinearConfig: kda_gate_lower_bound must be null or a finite number < 0, got {bound!r}"
            )
        if self.q_lora_rank is not None:
            raise ValueError("KimiLinearConfig: q_lora_rank must be null (Kimi Linear projects q directly)")
        if not self.mla_use_nope:
            raise ValueError("KimiLinearConfig: only mla_use_nope = true is supported (no rotary embedding)")
        if self.moe_router_activation_func != "sigmoid":
            raise ValueError(
                f"KimiLinearConfig: moe_router_activation_func must be 'sigmoid', got {self.moe_router_activation_func!r}"
            )
        if self.num_experts % self.num_expert_group:
            raise ValueError("KimiLinearConfig: num_experts must be a multiple of num_expert_group")
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ValueError("KimiLinearConfig: num_experts_per_token must be in [1, num_experts]")

    def is_kda_layer(self, layer: int) -> bool:
        return layer in self.kda_layers

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0
            and layer >= self.first_k_dense_replace
            and (layer - self.first_k_dense_replace) % self.moe_layer_freq == 0
        )

    @property
    def mla_qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_cache_dim(self) -> int:
        """Width of one latent-cache row: the normalised latent then the shared key slice."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kda_projection_size(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    def latent_cache_bytes_per_token(self, element_size: int = 2) -> int:
        """Bytes one cached token takes: a latent-cache row in every MLA layer (KDA layers cache
        nothing per token)."""
        return len(self.full_attn_layers) * self.mla_cache_dim * element_size

    def kda_state_bytes_per_sequence(self, element_size: int = 2) -> int:
        """Bytes one sequence's KDA caches take whatever its length: per KDA layer the fp32
        recurrent state [H, K, K] and the q, k, v conv states [H*K, W-1] in the model's dtype."""
        state = self.kda_num_heads * self.kda_head_dim**2 * 4
        conv = 3 * self.kda_projection_size * (self.short_conv_kernel_size - 1) * element_size
        return len(self.kda_layers) * (state + conv)

    # ------------------------------------------------------------------ json
    @classmethod
    def from_dict(cls, raw: dict) -> "KimiLinearConfig":
        raw = copy.deepcopy(raw)
        linear = raw.pop("linear_attn_config", None) or {}
        layer_types = raw.pop("layer_types", None)
        known = {f.name for f in fields(cls)} - {"extra", "kda_layers", "full_attn_layers"}
        kwargs = {name: raw.pop(name) for name in list(raw) if name in known}
        n_layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        if layer_types is not None:
            if len(layer_types) != n_layers:
                raise ValueError(f"KimiLinearConfig: layer_types has {len(layer_types)} entries for {n_layers} layers")
            unknown = sorted({t for t in layer_types if t not in KDA_LAYER_TYPES + MLA_LAYER_TYPES})
            if unknown:
                raise ValueError(f"KimiLinearConfig: unknown layer_types {unknown}")
            kwargs["kda_layers"] = [i for i, t in enumerate(layer_types) if t in KDA_LAYER_TYPES]
            kwargs["full_attn_layers"] = [i for i, t in enumerate(layer_types) if t in MLA_LAYER_TYPES]
        else:
            if "full_attn_layers" not in linear:
                raise ValueError("KimiLinearConfig: config has neither layer_types nor linear_attn_config.full_attn_layers")
            kwargs["full_attn_layers"] = [i - 1 for i in linear["full_attn_layers"]]
            if "kda_layers" in linear:
                kwargs["kda_layers"] = [i - 1 for i in linear["kda_layers"]]
        linear_fields = {
            "num_heads": "kda_num_heads",
            "head_dim": "kda_head_dim",
            "short_conv_kernel_size": "short_conv_kernel_size",
            "gate_lower_bound": "kda_gate_lower_bound",
        }
        for key, name in linear_fields.items():
            if key in linear:
                kwargs[name] = linear.pop(key)
        linear.pop("kda_layers", None)
        linear.pop("full_attn_layers", None)
        if linear:
            raw["linear_attn_config"] = linear
        return cls(**kwargs, extra=raw)

    def to_dict(self) -> dict:
        out = copy.deepcopy(self.extra)
        linear = dict(out.pop("linear_attn_config", {}))
        linear.update(
            num_heads=self.kda_num_heads,
            head_dim=self.kda_head_dim,
            short_conv_kernel_size=self.short_conv_kernel_size,
            kda_layers=[i + 1 for i in sorted(self.kda_layers)],
            full_attn_layers=[i + 1 for i in sorted(self.full_attn_layers)],
        )
        if self.kda_gate_lower_bound is not None:  # absent from the released file: the softplus gate
            linear["gate_lower_bound"] = self.kda_gate_lower_bound
        skip = {
            "extra", "kda_layers", "full_attn_layers", "kda_num_heads", "kda_head_dim", "short_conv_kernel_size",
            "kda_gate_lower_bound",
        }
        for f in fields(self):
            if f.name not in skip:
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["linear_attn_config"] = linear
        out.setdefault("model_type", "kimi_linear")
        out.setdefault("architectures", ["KimiLinearForCausalLM"])
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "KimiLinearConfig":
        """Reads a config.json file, or the config.json inside a directory."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes config.json in the released checkpoint's format (1-based layer lists)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "KimiLinearConfig":
        """"micro": shrunk head dims for fast CPU reference tests; "small": the doc's ~10M-parameter
        test/benchmark model with production head dims; "kimi-linear-48b": the released shape."""
        if name not in PRESETS:
            raise ValueError(f"KimiLinearConfig: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**copy.deepcopy(PRESETS[name]))


PRESETS: dict[str, dict] = {
    "micro": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        full_attn_layers=[2],
        kda_num_heads=2,
        kda_head_dim=32,
        num_attention_heads=2,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=128,
        num_experts=4,
        num_experts_per_token=2,
        moe_intermediate_size=32,
        routed_scaling_factor=2.446,
        model_max_length=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "small": dict(
        vocab_size=1024,
        hidden_size=256,
        num_hidden_layers=6,
        full_attn_layers=[3, 5],
        kda_num_heads=4,
        kda_head_dim=128,
        num_attention_heads=4,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=1024,
        num_experts=8,
        num_experts_per_token=2,
        moe_intermediate_size=256,
        model_max_length=65536,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "kimi-linear-48b": dict(),
}
