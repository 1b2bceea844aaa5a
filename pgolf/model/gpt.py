"""The GPT of the PR #549 / PR #960 recipe, every component switchable from params.yaml.

Architecture (docs/RECIPE.md §2; each item is a :class:`ModelConfig` field):

- token embedding (+ BigramHash) → weightless RMSNorm → SmearGate = ``x0``;
- ``num_layers`` blocks, optionally a U-Net: the first ``L//2`` (encoder)
  push their outputs, decoder layer j adds ``skip_weights[j] ⊙`` the output of
  encoder layer ``L_enc-1-j`` before running;
- block: ``x ← m0⊙x + m1⊙x0`` (resid_mix), then attention and a
  LeakyReLU(slope)² MLP on ``RMSNorm(x)·1/√(l+1)`` (ln_scale), each added with
  a per-channel scale;
- attention (:mod:`pgolf.model.attention`): GQA, QK RMSNorm + per-head gain,
  partial RoPE, XSA on chosen layers, shared value embedding on chosen
  layers, VRL gates σ(α_l) mixing layer 0's value into layers 1..L-1;
- final RMSNorm, tied (or separate) output matrix, ``c·tanh(z/c)`` soft-cap,
  cross-entropy in fp32 (``fused_loss``, ``fused_mlp``: fused kernels, same math).

The 66 block matrices live in four banks (``qo_bank`` [2L, D, D]: Q of layers
0..L-1 then O; ``kv_bank`` [2L, KV·hd, D]: K then V; ``mlp_up_bank`` [L, H, D];
``mlp_down_bank`` [L, D, H]) so Muon can orthogonalise them batched. Layer i
uses slices ``[i]`` and ``[L+i]``; :func:`unbank_state_dict` gives the
conventional 2-D names used by quantisation.

RoPE base: one fixed ``rope_base`` everywhere (:mod:`pgolf.model.rope`); the record
profile sets ``rope_base: 22082``, what the records' NTK rule effectively trained
with at T=2048 (docs/RECIPE.md §2.3, §6.11).

Dtypes: every parameter is fp32 in the module and the training loop runs bf16
autocast on GPU. The records kept the three embedding tables as bf16
parameters (docs/RECIPE.md §2.9); we keep them fp32 so the AdamW update is not
rounded to bf16 (the int8 export of those tables is unaffected). Their bf16
tables made the records' whole residual stream bf16; ``residual_dtype:
autocast`` reproduces that (x0 is cast to the autocast dtype, and the
per-channel scales follow the stream's dtype), which halves the memory
traffic of every elementwise kernel and of the saved activations. With
``float32`` the stream stays fp32 and only the matmuls and attention run in
bf16. Neither setting changes anything without autocast (CPU runs).

Frontier elements (docs/FRONTIER.md §2, each a ModelConfig field, off by default): depth recurrence, gated skips
and the two-lane decoder (:mod:`pgolf.model.topology`), SparseAttnGate and the input SmearGate
(:mod:`pgolf.model.frontier_gates`), document-local attention (:mod:`pgolf.model.doc_attention`). KV-cache entries
are per visit (autoregressive sampling: :mod:`pgolf.model.sampling`). Test-time adapters (pgolf.eval.lora) enter through an optional ``adapters`` argument.

Late QAT (docs/RECIPE.md §3.5): :meth:`GPT.set_qat` fake-quantises all bank slices on the export grid (each bank at
its class's bits) (:func:`pgolf.quant.grid.fake_quantize_ste`) in training-mode forwards, switched by a tensor
buffer so a compiled graph honours the switch.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.attention import HEAD_SLOT, Adapters, add_adapter
from pgolf.model.block import Block
from pgolf.model.topology import (PARALLEL_POST_INIT, PARALLEL_RESID_INIT, merge_skip, parallel_lanes_update,
                                  split_encoder_decoder, visit_order)
from pgolf.model.embeddings import BigramHash, SmearGate, ValueEmbedding, rms_norm
from pgolf.model.config import ModelConfig
from pgolf.model.layout import BANK_CLASS, BANK_NAMES
from pgolf.model.state import param_groups_by_role, param_roles, rebank_state_dict, unbank_state_dict
from pgolf.quant.grid import fake_quantize_ste, qmax_for_bits
from pgolf.model.rope import rope_tables

# Initial values fixed by the recipe (docs/RECIPE.md §2.5-§2.7, §2.9).
VE_EMBED_INIT_STD = 0.01
VE_SCALE_INIT = 0.1
BIGRAM_SCALE_INIT = 0.05
# Positions covered by the precomputed RoPE tables (longer inputs compute theirs).
ROPE_TABLE_POSITIONS = 4096

__all__ = ["GPT", "ModelConfig", "param_roles", "param_groups_by_role", "unbank_state_dict", "rebank_state_dict"]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.fused_loss:  # imported only when on: an optional module of the bundle (pgolf/submission/optional.py)
            from pgolf.model.fused_loss import softcap_token_nll
            self.fused_nll = softcap_token_nll
        if cfg.doc_attention:  # the same
            from pgolf.model.doc_attention import document_mask
            self.document_mask = document_mask
        L, D, V = cfg.num_layers, cfg.model_dim, cfg.vocab_size
        self.tok_emb = nn.Embedding(V, D)
        self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, D) if cfg.bigram_buckets else None
        self.smear = SmearGate(D) if cfg.smear_gate else None
        self.input_smear = None
        if cfg.input_smear_window:  # imported only when on (pgolf/submission/optional.py)
            from pgolf.model.frontier_gates import InputSmearGate
            self.input_smear = InputSmearGate(cfg.input_smear_window, cfg.bos_id, cfg.input_smear_bos_mask)
        self.value_embed = (ValueEmbedding(V, cfg.ve_dim, cfg.kv_dim, len(cfg.ve_layers))
                            if cfg.ve_layers else None)
        self.qo_bank = nn.Parameter(torch.empty(2 * L, D, D))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, cfg.kv_dim, D))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, cfg.mlp_hidden, D))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, D, cfg.mlp_hidden))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.skip_weights = (nn.Parameter(torch.empty(cfg.num_skip_weights, D))
                             if cfg.num_skip_weights else None)
        self.skip_gates = nn.Parameter(torch.empty(cfg.num_skip_weights, D)) if cfg.skip_gates else None
        parallel = cfg.parallel_start_layer > 0
        self.parallel_post_lambdas = nn.Parameter(torch.empty(L, 2, 2)) if parallel else None
        self.parallel_resid_lambdas = nn.Parameter(torch.empty(L, 2)) if parallel else None
        # Depth recurrence on (every phase after the switch: eval, Hessians, TTT); the
        # trainer turns it off until its switch point. A Python flag: compile guards on it.
        self.looping = cfg.recur_loops > 0
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, V, bias=False)
        # Late-QAT switch: a tensor so torch.compile reads it at run time instead
        # of baking it in; bits are a Python int (changing them may recompile).
        self.register_buffer("qat_enabled", torch.zeros((), dtype=torch.bool), persistent=False)
        self.qat_bits: dict[str, int] | None = None  # per bank, while late QAT is configured
        # RoPE tables for the first ROPE_TABLE_POSITIONS positions, precomputed:
        # computed inside a compiled graph, inductor re-evaluated pow/cos/sin per
        # q/k element in every layer's kernel (forward and backward).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.doc_span: torch.Tensor | None = None  # document attention's segment cap (set_doc_span)
        self.reset_buffers()
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """docs/RECIPE.md §2.9: orthogonal Q/K/V/up and side projections, zero O/down."""
        cfg, L = self.cfg, self.cfg.num_layers
        nn.init.normal_(self.tok_emb.weight, std=cfg.tok_emb_init_std)
        for i in range(L):
            nn.init.orthogonal_(self.qo_bank[i])
            nn.init.orthogonal_(self.kv_bank[i])
            nn.init.orthogonal_(self.kv_bank[L + i])
            nn.init.orthogonal_(self.mlp_up_bank[i])
        self.qo_bank[L:].zero_()
        self.mlp_down_bank.zero_()
        if self.bigram is not None:
            # Zero table + orthogonal projection: the path starts silent but learns.
            self.bigram.embed.weight.zero_()
            nn.init.orthogonal_(self.bigram.proj.weight)
            self.bigram.scale.fill_(BIGRAM_SCALE_INIT)
        if self.smear is not None:
            self.smear.gate.zero_()
        if self.value_embed is not None:
            nn.init.normal_(self.value_embed.embed.weight, std=VE_EMBED_INIT_STD)
            nn.init.orthogonal_(self.value_embed.proj.weight)
            self.value_embed.scale.fill_(VE_SCALE_INIT)
            self.value_embed.layer_scales.fill_(1.0)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        if self.skip_gates is not None:
            self.skip_gates.zero_()
        if self.parallel_post_lambdas is not None:
            self.parallel_post_lambdas.fill_(PARALLEL_POST_INIT)
            self.parallel_resid_lambdas.fill_(PARALLEL_RESID_INIT)
        if self.input_smear is not None:
            self.input_smear.reset_parameters()
        if self.lm_head is not None:
            self.lm_head.weight.zero_()
        for block in self.blocks:
            block.reset_parameters()

    def reset_buffers(self) -> None:
        """Re-create non-persistent state (late QAT off, RoPE tables), e.g. after ``to_empty``."""
        device = self.qat_enabled.device
        self.qat_enabled = torch.zeros((), dtype=torch.bool, device=device)
        self.qat_bits = None
        positions = torch.arange(ROPE_TABLE_POSITIONS if self.cfg.rope_dims else 0, device=device)
        self.rope_cos, self.rope_sin = rope_tables(positions, self.cfg.rope_dims, self.cfg.rope_base)

    def extend_rope_tables(self, positions: int) -> None:
        """Precompute RoPE tables for ``positions`` positions (packed rows longer than the default)."""
        if self.cfg.rope_dims and positions > self.rope_cos.shape[0]:
            table = torch.arange(positions, device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = rope_tables(table, self.cfg.rope_dims, self.cfg.rope_base)

    def set_doc_span(self, tokens: int) -> None:
        """Segments of ≤ ``tokens`` (0 = cut at row edges only); filled in place, so no recompile."""
        self.doc_span = ((torch.tensor(tokens, device=self.rope_cos.device) if self.doc_span is None
                          else self.doc_span.fill_(tokens)) if tokens else None)

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) [length, rope_dims/2] for positions start..start+length-1."""
        if not self.cfg.rope_dims:
            return None
        end = start + length
        if end <= self.rope_cos.shape[0]:
            return self.rope_cos[start:end], self.rope_sin[start:end]
        positions = torch.arange(start, end, device=self.rope_cos.device)
        return rope_tables(positions, self.cfg.rope_dims, self.cfg.rope_base)

    # ------------------------------------------------------------ late QAT
    def set_qat(self, enabled: bool, bits: int | Mapping[str, int]) -> None:
        """Turn STE fake quantisation of every bank slice on/off for training forwards.

        ``bits``: the grid's bits per block-matrix class (``{"attn": 6, "mlp": 6}``,
        pgolf.model.layout.BLOCK_CLASSES), each bank on its class's grid; an int
        means the same bits for every class. Call once with ``enabled=False``
        before compiling to put the switch in the graph; later flips then take
        effect without recompiling.
        """
        by_class = bits if isinstance(bits, Mapping) else {cls: bits for cls in BANK_CLASS.values()}
        per_bank = {bank: int(by_class[cls]) for bank, cls in BANK_CLASS.items()}
        for width in per_bank.values():
            qmax_for_bits(width)
        self.qat_bits = per_bank
        self.qat_enabled.fill_(bool(enabled))

    def _banks(self) -> tuple[torch.Tensor, ...]:
        banks = {name: getattr(self, name) for name in BANK_NAMES}
        if self.training and self.qat_bits is not None:
            banks = {name: torch.where(self.qat_enabled, fake_quantize_ste(b, self.qat_bits[name]), b)
                     for name, b in banks.items()}
        return tuple(banks[name] for name in BANK_NAMES)

    # -------------------------------------------------------------- forward
    def set_recurrence(self, on: bool) -> None:
        """Switch depth recurrence (a no-op without ``recur_loops``)."""
        self.looping = bool(on) and self.cfg.recur_loops > 0

    def visits(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(encoder, decoder) physical layers in visit order (pgolf.model.topology)."""
        cfg = self.cfg
        order = visit_order(cfg.num_layers, cfg.recur_start, cfg.recur_end, cfg.recur_loops, self.looping)
        return split_encoder_decoder(order, cfg.unet_skips)

    def _hidden(self, ids: torch.Tensor, cache: KVCache | None = None, adapters: Adapters | None = None):
        """ids [B, T] → final normalised hidden states [B, T, D]; ``adapters`` adds test-time adapter outputs."""
        cfg, L = self.cfg, self.cfg.num_layers
        prev_ids = cache.prev_ids if cache is not None else None
        prev_embed = cache.prev_embed if cache is not None else None
        h = self.tok_emb(ids)
        if self.bigram is not None:
            h = h + self.bigram(ids, prev_ids)
        if self.input_smear is not None:
            raw = h
            h = self.input_smear(h, ids, cache.prev_raw_embed if cache is not None else None)
            if cache is not None:
                cache.prev_raw_embed = raw[:, -1]
        h = rms_norm(h)
        if cache is not None:
            cache.prev_ids, cache.prev_embed = ids[:, -1], h[:, -1]
        if self.smear is not None:
            h = self.smear(h, prev_embed)
        device_type = h.device.type
        if cfg.residual_dtype == "autocast" and torch.is_autocast_enabled(device_type):
            h = h.to(torch.get_autocast_dtype(device_type))
        x = x0 = h
        rope = self._rope(cache.length if cache is not None else 0, ids.shape[1])
        doc_mask = self.document_mask(ids, cfg.bos_id, cfg.doc_attention_impl, self.doc_span) if cfg.doc_attention else None
        value_base = self.value_embed(ids) if self.value_embed is not None else None
        qo, kv, up, down = self._banks()
        encoder, decoder = self.visits()
        skips: list[torch.Tensor] = []
        first_value = None
        lanes: list[torch.Tensor] | None = None
        for slot, (i, is_decoder) in enumerate([(i, False) for i in encoder] + [(i, True) for i in decoder]):
            block = self.blocks[i]
            if is_decoder and lanes is None and 0 < cfg.parallel_start_layer <= i:
                lanes = [x, x]
            if is_decoder and self.skip_weights is not None and skips:
                j = slot - len(encoder)
                gate = self.skip_gates[j] if self.skip_gates is not None else None
                if lanes is None:
                    x = merge_skip(x, skips.pop(), self.skip_weights[j], gate)
                else:
                    lanes[0] = merge_skip(lanes[0], skips.pop(), self.skip_weights[j], gate)
            value_add = None
            if value_base is not None and i in cfg.ve_layers:
                value_add = value_base * self.value_embed.layer_scales[cfg.ve_layers.index(i)]
            weights = (qo[i], kv[i], kv[L + i], qo[L + i], up[i], down[i])
            adapt = None if adapters is None else functools.partial(adapters, slot)
            if lanes is None:
                x, value = block(x, x0, weights, rope, value_add, first_value, cache, slot, doc_mask, adapt)
            else:
                _, attn_out, value = block.attend(lanes[0], x0, weights, rope, value_add, first_value, cache,
                                                  slot, doc_mask, adapt)
                mlp_out = block.feed_forward(lanes[1], up[i], down[i], adapt)
                lanes = list(parallel_lanes_update(lanes[0], lanes[1], attn_out, mlp_out,
                                                   self.parallel_resid_lambdas[i], self.parallel_post_lambdas[i]))
            if slot == 0:
                first_value = value
            if not is_decoder and self.skip_weights is not None:
                skips.append(x)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        if cache is not None:
            cache.length += ids.shape[1]
        return rms_norm(x)

    def _logits(self, x: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 → fp32, fp64 stays
        if adapters is not None:  # the head adapter acts before the soft-cap
            logits = add_adapter(logits, functools.partial(adapters, HEAD_SLOT), "head", x)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def final_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] → the final norm's output [B, T, D]: the output projection's input."""
        return self._hidden(ids)

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] → soft-capped fp32 logits [B, T, V]."""
        return self._logits(self._hidden(ids))

    def adapted_hidden(self, ids: torch.Tensor, adapters: Adapters) -> torch.Tensor:  # pgolf.eval.doc_ttt
        return self._hidden(ids, None, adapters)
    adapted_logits = _logits  # (x, adapters): soft-capped logits with the head adapter

    def token_nll(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy in nats, fp32 [B, T]."""
        if self.cfg.fused_loss:
            weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
            return self.fused_nll(self._hidden(ids), weight, targets, self.cfg.logit_softcap)
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all positions (fp32 scalar)."""
        if self.cfg.fused_loss:
            return self.token_nll(ids, targets).mean()
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    # ----------------------------------------------------------- bookkeeping
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
