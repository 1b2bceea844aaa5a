"""ModelConfig: the `model` section of params.yaml; every architectural component is a field.

It travels inside checkpoints (:meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`), so later stages never read model params from
params.yaml. See :mod:`pgolf.model.gpt` for what each component does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pgolf.model.attention import ATTENTION_BACKENDS, DOC_ATTENTION_IMPLS
from pgolf.config import check, from_params, to_dict


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int          # GQA: query heads share KV heads in groups of num_heads/num_kv_heads
    mlp_mult: float            # MLP hidden = mlp_mult · model_dim (must be a whole number)
    mlp_leaky_slope: float     # MLP activation LeakyReLU(slope)²
    tie_embeddings: bool       # output matrix = tok_emb; else a separate zero-initialised lm_head
    logit_softcap: float       # logits = c·tanh(z/c); 0 disables
    tok_emb_init_std: float
    ln_scale: bool             # scale normalised block inputs by 1/√(layer+1)
    unet_skips: bool           # encoder→decoder skips with learned per-channel weights
    resid_mix: bool            # learned per-channel mix of the residual with x0 before each block
    rope_dims: int             # rotated dims per head (even, ≤ head_dim); 0 disables RoPE
    rope_base: float           # one fixed base everywhere (see module docstring)
    qk_norm: bool              # RMSNorm of q and k per head before RoPE
    qk_gain_init: float        # initial per-head gain multiplying q
    xsa_layers: tuple[int, ...]  # layers with exclusive self-attention
    ve_layers: tuple[int, ...]   # layers adding the shared value embedding; empty disables
    ve_dim: int
    smear_gate: bool
    bigram_buckets: int        # 0 disables BigramHash
    bigram_dim: int
    vrl: bool                  # value residual gates on layers 1..L-1
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math", "fa4"]
    # Residual stream dtype: "float32", or "autocast" = the autocast dtype (bf16 on
    # GPU) whenever autocast is on, as in the records (bf16 embedding tables made
    # their whole stream bf16); fp32 runs (CPU) are unaffected either way.
    residual_dtype: Literal["float32", "autocast"]
    # Frontier elements (docs/FRONTIER.md §2; pgolf.model.topology, pgolf.model.frontier_gates,
    # pgolf.model.doc_attention). The defaults are today's model.
    skip_gates: bool = False   # sigmoid gates on the U-Net skips (needs unet_skips)
    recur_start: int = 0       # depth recurrence: physical layers recur_start..recur_end (inclusive) ...
    recur_end: int = 0
    recur_loops: int = 0       # ... run 1 + recur_loops times; 0 = off
    parallel_start_layer: int = 0  # two-lane decoder from this physical layer on; 0 = off
    attn_gate_window: int = 0  # SparseAttnGate: per-head σ(scale·W·n[:window]) on attention outputs; 0 = off
    attn_gate_scale: float = 0.5
    input_smear_window: int = 0  # input-dependent SmearGate on the raw embedding; 0 = off
    input_smear_bos_mask: bool = True  # no smear into a BOS token (the F1855 fix)
    doc_attention: bool = False  # attention never crosses a BOS (document-local attention)
    doc_attention_impl: str = "auto"  # auto (flex on CUDA, dense elsewhere) | dense | flex
    bos_id: int = 1            # the tokenizer's BOS id (pgolf.data.tokenizer.BOS_ID)
    # Fused kernels (same math; Triton on CUDA, the plain torch formula elsewhere):
    fused_mlp: bool = False    # activation in the MLP matmuls' epilogues (pgolf.model.fused_mlp)
    fused_loss: bool = False   # soft-capped cross-entropy chunked over rows (pgolf.model.fused_loss)

    def __post_init__(self) -> None:
        check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
        check(self.doc_attention_impl in DOC_ATTENTION_IMPLS, "doc_attention_impl",
              f"must be one of {list(DOC_ATTENTION_IMPLS)}")
        check(self.num_layers >= 1, "num_layers", "must be >= 1")
        check(self.num_heads >= 1, "num_heads", "must be >= 1")
        check(self.model_dim >= 1 and self.model_dim % self.num_heads == 0, "model_dim",
              f"must be a positive multiple of num_heads ({self.num_heads})")
        check(1 <= self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
              "num_kv_heads", f"must divide num_heads ({self.num_heads})")
        hidden = self.mlp_mult * self.model_dim
        check(self.mlp_mult > 0 and hidden == round(hidden), "mlp_mult",
              "must be > 0 with mlp_mult·model_dim a whole number")
        check(0.0 <= self.mlp_leaky_slope <= 1.0, "mlp_leaky_slope", "must be in [0, 1]")
        check(self.logit_softcap >= 0, "logit_softcap", "must be >= 0 (0 disables)")
        check(self.tok_emb_init_std > 0, "tok_emb_init_std", "must be > 0")
        check(0 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0, "rope_dims",
              f"must be even and in [0, head_dim={self.head_dim}]")
        check(self.rope_base > 1, "rope_base", "must be > 1")
        check(self.qk_gain_init > 0, "qk_gain_init", "must be > 0")
        for key, layers in (("xsa_layers", self.xsa_layers), ("ve_layers", self.ve_layers)):
            check(all(0 <= i < self.num_layers for i in layers), key,
                  f"layer indices must be in [0, {self.num_layers})")
            check(len(set(layers)) == len(layers), key, "duplicate layer index")
        check(self.ve_dim >= 1 if self.ve_layers else self.ve_dim >= 0, "ve_dim",
              "must be >= 1 when ve_layers is not empty")
        check(self.bigram_buckets == 0 or self.bigram_buckets >= 2, "bigram_buckets",
              "must be 0 (off) or >= 2 (one bucket is reserved for position 0)")
        check(self.bigram_dim >= 1 if self.bigram_buckets else self.bigram_dim >= 0, "bigram_dim",
              "must be >= 1 when bigram_buckets > 0")
        check(not self.vrl or self.num_layers >= 2, "vrl", "needs num_layers >= 2")
        check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
              f"must be one of {list(ATTENTION_BACKENDS)}")
        check(self.residual_dtype in ("float32", "autocast"), "residual_dtype",
              "must be 'float32' or 'autocast'")
        check(not self.skip_gates or (self.unet_skips and self.num_skip_weights > 0), "skip_gates",
              "needs unet_skips and at least 2 layers")
        check(self.recur_loops >= 0, "recur_loops", "must be >= 0 (0 = off)")
        if self.recur_loops:
            check(0 <= self.recur_start <= self.recur_end < self.num_layers, "recur_start",
                  f"need 0 <= recur_start <= recur_end < num_layers ({self.num_layers})")
        check(0 <= self.parallel_start_layer < self.num_layers, "parallel_start_layer",
              f"must be in [0, num_layers={self.num_layers}) (0 = off)")
        for key in ("attn_gate_window", "input_smear_window"):
            check(0 <= getattr(self, key) <= self.model_dim, key, f"must be in [0, model_dim={self.model_dim}]")
        check(self.attn_gate_scale > 0, "attn_gate_scale", "must be > 0")
        check(0 <= self.bos_id < self.vocab_size, "bos_id", f"must be a token id < vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_mult * self.model_dim))

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers // 2 if self.unet_skips else 0

    @property
    def num_visits(self) -> int:
        """Virtual layers with depth recurrence on (num_layers without it)."""
        return self.num_layers + self.recur_loops * (self.recur_end - self.recur_start + 1)

    @property
    def num_skip_weights(self) -> int:
        """Skips of the longest visit list (recurrence on): min(encoder, decoder) visits."""
        n_enc = self.num_visits // 2 if self.unet_skips else 0
        return min(n_enc, self.num_visits - n_enc)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model_config") -> "ModelConfig":
        """Rebuild from :meth:`to_dict` output; errors name ``source.<key>``.

        Keys of the frontier elements (the fields with defaults) may be absent:
        a checkpoint written before they existed has them off.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return from_params(cls, {source: {**defaults, **data}}, source)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
