"""One transformer block: resid mix, attention, LeakyReLU² MLP, each scaled (docs/RECIPE.md §2).

The block reads its matrices from the banks of :class:`pgolf.model.gpt.GPT`
(``weights`` = W_q, W_k, W_v, W_o, W_up, W_down) and takes an optional
``adapt`` (test-time LoRA, :mod:`pgolf.eval.lora`) whose "o" reads the block's
normalised input and whose "mlp" reads the MLP's normalised input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.attention import Adapt, BankLinear, CausalSelfAttention, add_adapter
from pgolf.model.config import ModelConfig
from pgolf.model.embeddings import rms_norm
# DocMask in annotations: pgolf.model.doc_attention's, not imported here (only when model.doc_attention);
# KVCache: pgolf.model.sampling's (only when sampling)


class MLP(nn.Module):
    def __init__(self, leaky_slope: float, fused: bool = False):
        super().__init__()
        self.leaky_slope, self.fused = leaky_slope, fused
        if fused:  # imported only when on: an optional module of the bundle (pgolf/submission/optional.py)
            from pgolf.model.fused_mlp import fused_mlp
            self.fused_mlp = fused_mlp
        self.fc = BankLinear()
        self.proj = BankLinear()

    def forward(self, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        if self.fused and not any(m._forward_pre_hooks or m._forward_hooks for m in (self.fc, self.proj)):
            return self.fused_mlp(x, w_up, w_down, self.leaky_slope)
        hidden = F.leaky_relu(self.fc(x, w_up), negative_slope=self.leaky_slope)
        return self.proj(hidden.square(), w_down)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        masked_attention = None
        if cfg.doc_attention:  # imported only when on: an optional module of the bundle (pgolf/submission/optional.py)
            from pgolf.model.doc_attention import masked_attention
        self.input_scale = (layer_idx + 1) ** -0.5 if cfg.ln_scale else 1.0
        self.attn = CausalSelfAttention(
            layer_idx=layer_idx, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, qk_norm=cfg.qk_norm, qk_gain_init=cfg.qk_gain_init,
            use_xsa=layer_idx in cfg.xsa_layers, use_vrl_gate=cfg.vrl and layer_idx > 0,
            backend=cfg.attention_backend, gate_window=cfg.attn_gate_window, gate_scale=cfg.attn_gate_scale,
            masked_attention=masked_attention)
        self.mlp = MLP(cfg.mlp_leaky_slope, cfg.fused_mlp)
        self.attn_scale = nn.Parameter(torch.empty(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.empty(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.empty(2, cfg.model_dim)) if cfg.resid_mix else None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.attn_scale.fill_(1.0)
            self.mlp_scale.fill_(1.0)
            if self.resid_mix is not None:
                self.resid_mix[0].fill_(1.0)
                self.resid_mix[1].zero_()
        self.attn.reset_parameters()

    def attend(self, x: torch.Tensor, x0: torch.Tensor, weights: tuple[torch.Tensor, ...], rope, value_add,
               first_value, cache: KVCache | None, slot: int | None, doc_mask: DocMask | None, adapt: Adapt = None):
        """(resid-mixed x, attn_scale ⊙ attention of it, own value); ``adapt``'s "o" reads the block input."""
        w_q, w_k, w_v, w_o = weights[:4]
        if self.resid_mix is not None:
            mix = self.resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        n = rms_norm(x) * self.input_scale
        attn_out, value = self.attn(n, w_q, w_k, w_v, w_o, rope, value_add, first_value, cache, slot, doc_mask, adapt)
        attn_out = add_adapter(attn_out, adapt, "o", n)
        # Scales take the stream's dtype, else an fp32 scale would promote a bf16 stream.
        return x, self.attn_scale.to(x.dtype) * attn_out, value

    def feed_forward(self, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, adapt: Adapt | None = None):
        n = rms_norm(x) * self.input_scale
        return self.mlp_scale.to(x.dtype) * add_adapter(self.mlp(n, w_up, w_down), adapt, "mlp", n)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, weights: tuple[torch.Tensor, ...],
                rope: tuple[torch.Tensor, torch.Tensor] | None, value_add: torch.Tensor | None,
                first_value: torch.Tensor | None, cache: KVCache | None, slot: int | None = None,
                doc_mask: DocMask | None = None, adapt: Adapt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, x0 [B, T, D]; weights = (W_q, W_k, W_v, W_o, W_up, W_down) → (x, own value)."""
        x, attn_out, value = self.attend(x, x0, weights, rope, value_add, first_value, cache, slot, doc_mask, adapt)
        x = x + attn_out
        return x + self.feed_forward(x, weights[4], weights[5], adapt), value
