"""Optional module groups: which pgolf modules a run needs only when a param turns their feature on.

The bundle (pgolf/submission/bundle.py) packs the driver's import closure
(:func:`pgolf.submission.size.counted_code_files`). A module listed here is
followed there only where it is imported *inside a function* (a lazy import,
at the branch that uses it) and only when its group's condition holds for
the run's params; an import at module level always brings it in. So a
forgotten entry only costs bytes, and an entry can only leave a module out
where the code imports it lazily.

A condition is a Python expression over the params' sections (``section.key``),
evaluated by :func:`needed`; the same text is the error message's reason.
:func:`missing_modules` is how the driver refuses, before any work, params
(e.g. a run-time ``--set``) that need a module its bundle does not carry.
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any, Mapping

# group: (condition over the params, the modules only it needs)
OPTIONAL_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "per-document LoRA TTT": ("eval_ttt.mode == 'doc_lora'",
                              ("pgolf.eval.doc_ttt", "pgolf.eval.global_sgd", "pgolf.eval.documents",
                               "pgolf.eval.lora")),
    "n-gram tilt": ("eval_sliding.ngram_tilt or eval_ttt.ngram_tilt", ("pgolf.eval.ngram_tilt",)),
    "LQER": ("quantize.lqer_top_k > 0", ("pgolf.quant.lqer", "pgolf.quant.lqer_factors")),
    "grouped layout": ("quantize.compression != 'plain' or quantize.compressor not in ('zstd', 'lzma')",
                       ("pgolf.quant.grouped", "pgolf.quant.grouped_cache", "pgolf.quant.compression")),
    "AWQ-lite": ("quantize.awq_top_k > 0", ("pgolf.quant.awq", "pgolf.quant.protected")),
    "frontier gates": ("model.attn_gate_window > 0 or model.input_smear_window > 0", ("pgolf.model.frontier_gates",)),
    "FA4": ("model.attention_backend == 'fa4'", ("pgolf.model.fa4_attention",)),
    "document-local attention": ("model.doc_attention", ("pgolf.model.doc_attention",)),
    "fused kernels": ("model.fused_mlp or model.fused_loss",
                      ("pgolf.model.fused_mlp", "pgolf.model.fused_loss", "pgolf.model.triton_support")),
    "TTT frozen blocks": ("eval_ttt.freeze_blocks > 0", ("pgolf.eval.frozen_blocks",)),
    "autoregressive calibration": ("hessians.source == 'autoregressive'", ("pgolf.model.sampling",)),
    "progressive context": ("train.seq_len_schedule or train.packed_rows", ("pgolf.train.context",)),
    # The submission driver trains without a resume file (RunFiles.resume is None): never packed.
    "training resume": ("False", ("pgolf.train.resume",)),
}


def needed(condition: str, params: Mapping[str, Any]) -> bool:
    """The value of ``condition`` (one of OPTIONAL_GROUPS') for ``params``; True where ``params`` lack a
    key it reads (a module is left out only when the params say it is not needed)."""
    sections = {name: SimpleNamespace(**values) for name, values in params.items() if isinstance(values, Mapping)}
    try:
        return bool(eval(condition, {"__builtins__": {}}, sections))  # our own constants, over plain data
    except (NameError, AttributeError):
        return True


def excluded_modules(params: Mapping[str, Any]) -> set[str]:
    """Dotted names of the optional modules ``params`` do not need (a module in two groups: needed if either is)."""
    wanted: set[str] = set()
    listed: set[str] = set()
    for condition, modules in OPTIONAL_GROUPS.values():
        listed.update(modules)
        if needed(condition, params):
            wanted.update(modules)
    return listed - wanted


def missing_modules(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(module, condition) for each module ``params`` need that cannot be imported here."""
    return [(module, condition) for condition, modules in OPTIONAL_GROUPS.values() if needed(condition, params)
            for module in modules if importlib.util.find_spec(module) is None]


def group_of(module: str) -> str | None:
    """The condition that packs ``module``, if it is optional."""
    return next((condition for condition, modules in OPTIONAL_GROUPS.values() if module in modules), None)
