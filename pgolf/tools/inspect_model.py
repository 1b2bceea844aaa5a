"""Summaries of the model files: checkpoint, weight averages, resume state, Hessians, ``.ptz``.

Checkpoints, Hessians and artifacts go through their own loaders
(``load_checkpoint``, ``load_hessians``, ``pgolf.quant.artifact.decode``), which
validate them; the two files the train stage writes without a reader
(averages, resume state) are loaded tensors-only and checked here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pgolf.quant import artifact as artifact_format
from pgolf.model import checkpoint as checkpoint_format
from pgolf.train import resume as train_state
from pgolf.train.averaging import AVERAGES_FORMAT
from pgolf.errors import DataError
from pgolf.quant.hessian_file import load_hessians
from pgolf.tools.inspect_summary import Summary, UnrecognisedFile, fmt, natural_key, one_line, table



def _load_tensors_only(path: Path) -> Any:
    """``torch.load`` with ``weights_only``; ``mmap`` so a 100 MB file is not read just to see its tag."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise DataError(f"{path}: not a readable tensors-only torch file ({type(exc).__name__}: "
                        f"{one_line(exc)})") from None


def summarise_torch_file(path: Path) -> Summary:
    """Dispatch on the payload's ``format`` tag (or, for Hessians, its keys)."""
    payload = _load_tensors_only(path)
    tag = payload.get("format") if isinstance(payload, dict) else None
    if tag == checkpoint_format.FORMAT:
        return summarise_checkpoint(path)
    if tag == AVERAGES_FORMAT:
        return _summarise_averages(path, payload)
    if tag == train_state.FORMAT:
        return _summarise_resume_state(path, payload)
    if isinstance(payload, dict) and "hessians" in payload:
        return summarise_hessians(path)
    what = f"keys {sorted(map(str, payload))[:6]}" if isinstance(payload, dict) else type(payload).__name__
    raise UnrecognisedFile(f"{path}: torch file with unknown content ({what}); not a pgolf artifact")


def tensor_norm(t: torch.Tensor) -> float | None:
    """L2 norm over all elements, accumulated in float64; None when it is not finite."""
    norm = float(t.detach().to(torch.float64).norm()) if t.numel() else 0.0
    return norm if math.isfinite(norm) else None


def non_finite_counts(tensors: dict[str, Any]) -> dict[str, int]:
    """Name → count of NaN/Inf values, for the float tensors that hold any."""
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                out[name] = bad
    return out


def non_finite_line(counts: dict[str, int]) -> list[str]:
    """The warning line for :func:`non_finite_counts` (nothing when all values are finite)."""
    if not counts:
        return []
    names = ", ".join(f"{k} ({v:,})" for k, v in list(counts.items())[:6]) + (", ..." if len(counts) > 6 else "")
    return [f"WARNING: NaN/Inf values in {len(counts)} tensor(s): {names}; quantize and eval refuse this file"]


def _model_line(cfg: dict) -> str:
    g = cfg.get
    return (f"model: {g('num_layers')} layers, dim {g('model_dim')}, {g('num_heads')} heads "
            f"({g('num_kv_heads')} KV), MLP x{g('mlp_mult')}, vocab {g('vocab_size')}")


def _losses_line(losses: Any) -> str:
    if not isinstance(losses, dict):
        return "held-out loss: n/a"
    return "held-out loss (nats): " + ", ".join(f"{k} {fmt(v)}" for k, v in losses.items())


def summarise_checkpoint(path: Path) -> Summary:
    """Model config, parameter table (shape, numel, dtype, norm) and the run facts in meta."""
    ckpt = checkpoint_format.load_checkpoint(path)
    cfg = ckpt.model_config.to_dict()
    params = [{"name": name, "shape": list(t.shape), "numel": t.numel(),
               "dtype": str(t.dtype).removeprefix("torch."), "norm": tensor_norm(t)}
              for name, t in sorted(ckpt.state_dict.items(), key=lambda kv: natural_key(kv[0]))]
    meta = ckpt.meta
    total = sum(p["numel"] for p in params)
    bad = non_finite_counts(ckpt.state_dict)
    facts = {"model_config": cfg, "num_parameters": total, "parameters": params, "meta": meta,
             "weights": meta.get("weights"), "holdout_loss": meta.get("holdout_loss"), "non_finite": bad}
    qat = meta.get("qat") if isinstance(meta.get("qat"), dict) else {}
    lines = [_model_line(cfg),
             f"parameters: {total:,} in {len(params)} tensors",
             *["  " + row for row in table(["name", "shape", "numel", "dtype", "norm"],
                                           [[p["name"], "x".join(map(str, p["shape"])) or "scalar",
                                             p["numel"], p["dtype"], p["norm"]] for p in params])],
             f"weights: {fmt(meta.get('weights'))} ({fmt(meta.get('weights_reason'))})",
             _losses_line(meta.get("holdout_loss")),
             f"run: {fmt(meta.get('steps'))} steps, {fmt(meta.get('tokens'))} tokens, stopped by "
             f"{fmt(meta.get('stopped_by'))}, seed {meta.get('seed', 'n/a')}, "
             f"{fmt(meta.get('swa_count'))} SWA snapshots, late QAT "
             + (f"{qat.get('bits')} bits from step {qat.get('from_step')}" if qat.get("enabled") else "off"),
             *non_finite_line(bad)]
    return Summary("checkpoint", str(path), facts, lines)


def _state_numel(state: Any) -> int | None:
    if not isinstance(state, dict):
        return None
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))


def _summarise_averages(path: Path, payload: dict) -> Summary:
    weights = payload.get("weights")
    if not isinstance(weights, dict):
        raise DataError(f"{path}: {AVERAGES_FORMAT} file without a 'weights' mapping")
    candidates = {name: _state_numel(state) for name, state in weights.items()}
    bad = non_finite_counts({f"{name}/{key}": t for name, state in weights.items() if isinstance(state, dict)
                             for key, t in state.items()})
    facts = {"version": payload.get("version"), "chosen": payload.get("chosen"),
             "holdout_loss": payload.get("holdout_loss"), "swa_count": payload.get("swa_count"),
             "ema_updates": payload.get("ema_updates"), "candidate_numel": candidates, "non_finite": bad}
    present = ", ".join(f"{k} ({fmt(v)} values)" if v is not None else f"{k} (none)"
                        for k, v in candidates.items())
    lines = [f"chosen: {fmt(facts['chosen'])}", _losses_line(facts["holdout_loss"]),
             f"candidates: {present}",
             f"SWA snapshots {fmt(facts['swa_count'])}, EMA updates {fmt(facts['ema_updates'])}",
             *non_finite_line(bad)]
    return Summary("train_averages", str(path), facts, lines)


def _summarise_resume_state(path: Path, payload: dict) -> Summary:
    finished = bool(payload.get("finished"))
    facts = {"version": payload.get("version"), "finished": finished, "step": payload.get("step"),
             "config_hash": payload.get("config_hash"), "elapsed_s": payload.get("elapsed_s"),
             "curve_rows": len(payload["curve_rows"]) if isinstance(payload.get("curve_rows"), list) else None}
    state = "finished marker (the run completed)" if finished else "in progress (a re-run resumes here)"
    progress = f"step {fmt(facts['step'])}" + ("" if finished else f", {fmt(facts['elapsed_s'])} s of training")
    lines = [f"state: {state}", progress, f"config hash: {fmt(facts['config_hash'])}"]
    return Summary("resume_state", str(path), facts, lines)


def hessian_stats(h: torch.Tensor) -> dict[str, Any]:
    """Size, trace, eigenvalue range and condition number of one raw Hessian, in float64.

    The condition number is None (shown as inf) when the smallest eigenvalue
    is not positive, i.e. H is singular; ``dead_columns`` counts zero diagonal
    entries, inputs that never fired (GPTQ zeroes those weight columns).
    """
    h64 = h.to(torch.float64)
    eig = torch.linalg.eigvalsh(h64)
    lo, hi = float(eig[0]), float(eig[-1])
    return {"size": int(h.shape[0]), "trace": float(torch.trace(h64)),
            "eig_min": lo, "eig_max": hi, "condition_number": hi / lo if lo > 0 else None,
            "dead_columns": int((torch.diagonal(h64) == 0).sum())}


def summarise_hessians(path: Path) -> Summary:
    """Per-matrix size, trace, condition number and dead columns, plus the sample counts."""
    hs = load_hessians(path)
    rows = {key: hessian_stats(h) for key, h in sorted(hs.hessians.items(), key=lambda kv: natural_key(kv[0]))}
    facts = {"num_tokens": hs.num_tokens, "num_sequences": hs.num_sequences, "num_matrices": len(rows),
             "matrices": rows}
    lines = [f"{len(rows)} matrices from {hs.num_sequences:,} sequences / {hs.num_tokens:,} tokens "
             "(raw sums of x^T x, undamped)",
             *["  " + row for row in table(
                 ["matrix", "size", "trace", "mean diag", "eig min", "eig max", "condition", "dead cols"],
                 [[k, r["size"], r["trace"], r["trace"] / max(r["size"], 1), r["eig_min"], r["eig_max"],
                   "inf" if r["condition_number"] is None else r["condition_number"], r["dead_columns"]]
                  for k, r in rows.items()])]]
    return Summary("hessians", str(path), facts, lines)


def _report_rows(path: Path) -> tuple[dict[str, dict], str | None]:
    """Per-tensor rows of the quantize stage's report.json next to ``path`` (name → row)."""
    report = path.parent / "report.json"
    if not report.is_file():
        return {}, None
    try:
        rows = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{report} is unreadable ({one_line(exc)})"
    if not (isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows)):
        return {}, f"{report} is not a per-tensor quantisation report"
    return {r["name"]: r for r in rows}, None


def _layout_lines(art: artifact_format.Artifact) -> list[str]:
    """Format 2: the index frame; format 3: each group's frame and compressor. Then the LQER factors."""
    lines = ([f"index frame {art.index_frame_bytes:,} bytes; \"in file\" = each tensor's own compressed frame"]
             if not art.frames else
             ["grouped layout: one frame per role group (\"in file\" lies in the groups)",
              *["  " + row for row in table(["frame", "compressor", "raw bytes", "bytes"], [
                  [f["frame"], f["compressor"], f["raw_bytes"], f["bytes"]] for f in art.frames])]])
    corrected = [t for t in art.tensors if t.lqer is not None]
    if corrected:
        lines.append(f"LQER on {len(corrected)} tensors:")
        lines += ["  " + row for row in table(["name", "mode", "rank", "group", "factor bytes"], [
            [t.name, t.lqer.mode, t.lqer.rank, t.lqer.group, t.lqer.stored_bytes()] for t in corrected])]
    return lines


def summarise_artifact(path: Path) -> Summary:
    """Header (format, compressor, sizes), per-tensor storage and, with report.json beside it, errors."""
    blob = path.read_bytes()
    art = artifact_format.decode(blob, str(path))
    _, version, comp_id, _, packed_len, raw_len, _ = artifact_format._HEADER.unpack_from(blob)
    compressor = {v: k for k, v in artifact_format.COMPRESSORS.items()}[comp_id]
    report, report_note = _report_rows(path)
    tensors = []
    own_frames = list(art.frame_bytes) or [None] * len(art.tensors)  # format 3: the groups' frames instead
    for t, in_file in zip(art.tensors, own_frames):
        row = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "method": t.method,
               "bits": t.bits, "stored_bytes": t.stored_bytes(), "file_bytes": in_file, "numel": math.prod(t.shape),
               "lqer": None if t.lqer is None else {"mode": t.lqer.mode, "rank": t.lqer.rank,
                                                   "group": t.lqer.group, "bytes": t.lqer.stored_bytes()}}
        extra = report.get(t.name, {})
        row.update({k: extra.get(k) for k in ("weight_mse", "hessian_error", "clip", "fallback")})
        if t.protect is not None:  # AWQ-lite's int8 column groups, as the file stores them
            row["protected_columns"] = [[s, s + t.protect.size] for s in t.protect.starts.tolist()]
        tensors.append(row)
    by_storage: dict[str, dict[str, int]] = {}
    for row in tensors:
        key = f"int{row['bits']}" if row["bits"] is not None else "passthrough"
        group = by_storage.setdefault(key, {"tensors": 0, "values": 0, "stored_bytes": 0, "file_bytes": 0})
        group["tensors"] += 1
        group["values"] += row["numel"]
        group["stored_bytes"] += row["stored_bytes"]
        group["file_bytes"] += row["file_bytes"] or 0
    facts = {"format_version": version, "compressor": compressor, "file_bytes": len(blob),
             "compressed_payload_bytes": packed_len, "payload_bytes": raw_len,
             "index_frame_bytes": art.index_frame_bytes, "frames": [dict(f) for f in art.frames],
             "num_parameters": sum(r["numel"] for r in tensors), "by_storage": by_storage,
             "model_config": art.model_config, "meta": art.meta, "tensors": tensors,
             "report": str(path.parent / "report.json") if report else None, "report_note": report_note}
    quant = art.meta.get("quantize", {}) if isinstance(art.meta.get("quantize"), dict) else {}
    level = quant.get("zstd_level") if compressor == "zstd" else quant.get("lzma_preset")
    has_errors = any(r["weight_mse"] is not None for r in tensors)
    headers = ["name", "shape", "method", "bits", "bytes", "in file"] + (["weight mse", "fallback"] if has_errors else [])
    lines = [f"format version {version}, compressor {compressor}" + (f" level {level}" if level is not None else ""),
             f"file {len(blob):,} bytes (payload {raw_len:,} bytes compressed to {packed_len:,}, "
             f"ratio {raw_len / max(packed_len, 1):.2f})",
             f"{len(tensors)} tensors, {facts['num_parameters']:,} values: "
             + ", ".join(f"{k} {v['tensors']} ({v['stored_bytes']:,} bytes stored, "
                         + (f"{v['file_bytes']:,} in the file)" if not art.frames else "in the group frames)")
                         for k, v in sorted(by_storage.items())),
             *_layout_lines(art),
             *["  " + row for row in table(headers, [
                 [r["name"], "x".join(map(str, r["shape"])) or "scalar", r["method"], r["bits"], r["stored_bytes"],
                  r["file_bytes"]]
                 + ([r["weight_mse"], r["fallback"]] if has_errors else []) for r in tensors])]]
    lines[4:4] = [f"awq: {r['name']} columns {r['protected_columns']} at int8" for r in tensors
                  if r.get("protected_columns")]
    lines.insert(0, _model_line(art.model_config))
    if report_note:
        lines.append(f"note: {report_note}")
    return Summary("quantized_artifact", str(path), facts, lines)
