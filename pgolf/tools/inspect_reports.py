"""Summaries of the JSON reports and the training log, recognised by their keys and lines.

A JSON object is matched against :data:`OBJECT_KINDS` (first kind whose
required keys it has), a JSON list by the keys of its rows. The summary shows
the kind's headline keys first, then every other key; ``--json`` gives the
report itself under ``data``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgolf.errors import DataError
from pgolf.io import non_finite_value
from pgolf.tools.inspect_summary import STAGE_LOG_FIRST_LINE, Summary, UnrecognisedFile, fmt, one_line, table

# JSON reports are small; a file past this is not one of them.
MAX_JSON_BYTES = 64 << 20


@dataclass(frozen=True)
class JsonKind:
    kind: str
    required: frozenset[str]
    headline: tuple[str, ...] = ()


def _kind(kind: str, required: str, headline: str = "") -> JsonKind:
    return JsonKind(kind, frozenset(required.split()), tuple(headline.split()))


# Order matters: more specific key sets first.
OBJECT_KINDS = (
    _kind("submission", "val_bpb bytes_total bytes_code github_id",  # submission.json or export's pgolf_results.json
          "val_bpb val_loss headline_eval bytes_total bytes_code bytes_model fits steps date git_commit"),
    _kind("bundle_metrics", "counted_bytes raw_bytes modules driver",
          "counted_bytes source_bytes raw_bytes archive_bytes num_modules driver sha256"),
    _kind("budget_report", "training eval fits", "fits training eval artifact_sha256"),
    _kind("driver_results", "code_bytes eval_sliding eval_ttt budget", "size eval_sliding eval_ttt budget"),
    _kind("size_report", "code_bytes model_bytes total_bytes limit fits",
          "fits total_bytes code_bytes model_bytes limit headroom"),
    _kind("eval_ttt_metrics", "val_bpb val_loss gain_vs_sliding",
          "val_bpb val_loss sliding_val_bpb gain_vs_sliding scored_tokens bytes chunks train_steps seconds"),
    _kind("eval_sliding_metrics", "val_bpb val_loss nonoverlap_val_bpb",
          "val_bpb val_loss scored_tokens bytes windows seconds nonoverlap_val_bpb nonoverlap_val_loss"),
    _kind("train_metrics", "steps final_weights holdout_loss_live",
          "steps tokens train_seconds ms_per_step final_weights holdout_loss_live holdout_loss_ema "
          "holdout_loss_swa stopped_by"),
    _kind("train_config", "model optim train", "world_size"),
    _kind("quant_metrics", "model_bytes num_quantized num_tensors",
          "model_bytes num_quantized num_tensors weight_mse_mean fallback_more_damping "
          "fallback_round_to_nearest seconds"),
    _kind("hessian_metrics", "num_matrices num_tokens num_sequences",
          "source num_matrices num_sequences num_tokens seconds"),
    _kind("corpus_manifest", "train_docs val_docs source_sha256",
          "source train_docs val_docs train_bytes val_bytes dropped_docs"),
    _kind("shards_manifest", "splits vocab_size tokenizer_sha256", "source vocab_size tokenizer_sha256"),
    _kind("tokenizer_meta", "vocab_size sha256 sentencepiece_version", "source vocab_size sha256"),
    _kind("live_metrics", "step train_loss lr_scale", "step train_loss lr_scale grad_norm tokens_per_s train_seconds"),
    _kind("data_metrics", "train_docs val_docs dropped_docs seconds"),
    _kind("data_metrics", "train_tokens val_tokens val_bytes_per_token"),
    _kind("data_metrics", "vocab_size seconds"),
)
LIST_KINDS = (
    _kind("quant_report", "name class method bits stored_bytes"),
    _kind("ttt_chunks", "chunk running_bpb chunk_bpb"),
    _kind("layer_error", "tensor weight_mse hessian_error"),
)


def _value(key: str, v: Any) -> str:
    if "seed" in key and isinstance(v, int):  # an identifier, not a quantity
        return str(v)
    if isinstance(v, (dict, list)):
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 160 else text[:157] + "..."
    return fmt(v)


def _key_lines(data: dict, headline: tuple[str, ...]) -> list[str]:
    keys = [k for k in headline if k in data] + sorted(k for k in data if k not in headline)
    return [f"{k}: {_value(k, data[k])}" for k in keys]


def _special_lines(kind: str, data: dict) -> list[str]:
    """A one-line reading of the numbers that matter most for some kinds."""
    try:
        if kind == "size_report":
            over = data["total_bytes"] - data["limit"]
            verdict = (f"fits, headroom {-over:,}" if data["fits"] else f"OVER THE LIMIT by {over:,}")
            return [f"code {data['code_bytes']:,} + model {data['model_bytes']:,} = {data['total_bytes']:,} "
                    f"of {data['limit']:,} bytes: {verdict}"]
        if kind in ("eval_sliding_metrics", "eval_ttt_metrics"):
            return [f"val_bpb {data['val_bpb']:.8f}, val_loss {data['val_loss']:.6f} nats over "
                    f"{data.get('scored_tokens', 0):,} targets / {data.get('bytes', 0):,} bytes"]
        if kind == "shards_manifest":
            return [f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents in {len(s['files'])} files"
                    for split, s in sorted(data["splits"].items())]
    except (KeyError, TypeError, ValueError, AttributeError):
        return ["note: some expected values are missing or not numbers"]
    return []


def _non_finite_facts(data: Any) -> dict:
    bad = non_finite_value(data)
    return {"non_finite_key": bad[0]} if bad else {}


def _non_finite_lines(data: Any) -> list[str]:
    """Python's json reads NaN/Infinity, which are not JSON: say so first."""
    bad = non_finite_value(data)
    return [f"WARNING: {bad[0]} is {bad[1]} (NaN/Inf is not valid JSON; the run that wrote it is broken)"] if bad else []


def _classify_object(data: dict) -> JsonKind | None:
    return next((k for k in OBJECT_KINDS if k.required <= data.keys()), None)


def _classify_list(rows: list) -> JsonKind | None:
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    return next((k for k in LIST_KINDS if all(k.required <= r.keys() for r in rows)), None)


def _quant_classes(rows: list[dict]) -> dict[str, dict]:
    """Per class of a quantisation report: tensor count, bit widths, clip rule and its values (k or quantiles)."""
    out: dict[str, dict] = {}
    for r in rows:
        c = out.setdefault(r["class"], {"tensors": 0, "bits": [], "rule": r.get("clip_rule") or "clip", "clip": []})
        c["tensors"] += 1
        for key in ("bits", "clip"):
            if r.get(key) is not None and r[key] not in c[key]:
                c[key].append(r[key])
    return {cls: {**c, "bits": sorted(c["bits"]), "clip": sorted(c["clip"])} for cls, c in sorted(out.items())}


def _summarise_list(kind: str, path: Path, rows: list[dict]) -> Summary:
    if kind == "quant_report":
        facts = {"tensors": rows, "num_tensors": len(rows),
                 "stored_bytes": sum(r["stored_bytes"] for r in rows if isinstance(r["stored_bytes"], int))}
        facts["classes"], facts["awq"] = _quant_classes(rows), [r for r in rows if r.get("awq")]
        lines = [f"{len(rows)} tensors, {facts['stored_bytes']:,} bytes stored before compression",
                 *[f"class {cls}: {c['tensors']} tensors, bits {c['bits']}, {c['rule']} {c['clip']}"
                   for cls, c in facts["classes"].items()],
                 *[f"awq: {r['name']} columns {[[s, s + r['awq']['size']] for s in r['awq']['starts']]} at "
                   f"int{r['awq']['bits']}" for r in facts["awq"]],
                 *table(["name", "class", "method", "bits", "clip", "weight mse", "fallback", "bytes", "in file"],
                        [[r["name"], r["class"], r["method"], r["bits"], r.get("clip"), r.get("weight_mse"),
                          r.get("fallback"), r["stored_bytes"], r.get("compressed_bytes")] for r in rows])]
        return Summary(kind, str(path), facts, lines)
    if kind == "layer_error":
        return _summarise_layer_error(path, rows)
    best = min(rows, key=lambda r: r["chunk_bpb"])
    facts = {"chunks": len(rows), "first": rows[0], "last": rows[-1], "best_chunk": best, "series": rows}
    lines = [f"{len(rows)} chunks; running bpb {fmt(rows[0]['running_bpb'])} after chunk {rows[0]['chunk']} "
             f"→ {fmt(rows[-1]['running_bpb'])} after chunk {rows[-1]['chunk']}",
             f"best chunk: {best['chunk']} at {fmt(best['chunk_bpb'])} bpb"]
    return Summary(kind, str(path), facts, lines)


def summarise_json(path: Path) -> Summary:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DataError(f"{path}: {size:,}-byte JSON is too large to be a pgolf report")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({one_line(exc)})") from None
    if isinstance(data, dict):
        found = _classify_object(data)
        if found is None:
            raise UnrecognisedFile(f"{path}: JSON object with unrecognised keys ({', '.join(sorted(data)[:8])}); "
                            "not a pgolf report")
        # Nested, so a report's own keys (a manifest has "path") never shadow the summary's.
        return Summary(found.kind, str(path), {"data": data, **_non_finite_facts(data)},
                       _non_finite_lines(data) + _special_lines(found.kind, data) + _key_lines(data, found.headline))
    if isinstance(data, list):
        found = _classify_list(data)
        if found is None:
            raise UnrecognisedFile(f"{path}: JSON list that is neither a quantisation report nor TTT chunks")
        return _summarise_list(found.kind, path, data)
    raise UnrecognisedFile(f"{path}: JSON {type(data).__name__}; not a pgolf report")


_STEP = re.compile(r"^step (\d+)/(\d+) loss (\S+).*?train_time (\S+)s")


def summarise_train_log(path: Path) -> Summary:
    """Runs started (a resumed run appends), step lines, the last step and the final weights line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: training log is not UTF-8 ({one_line(exc)})") from None
    lines = text.splitlines()
    starts = [line for line in lines if line.startswith("train: ")]
    steps = [m for m in map(_STEP.match, lines) if m]
    final = next((line for line in reversed(lines) if line.startswith("final weights: ")), None)
    facts: dict[str, Any] = {"lines": len(lines), "runs_started": len(starts), "step_lines": len(steps),
                             "final_weights": final.removeprefix("final weights: ") if final else None}
    out = [f"{len(lines)} lines, {len(starts)} run start(s), {len(steps)} step lines"]
    if starts:
        out.append(f"first start: {starts[0].removeprefix('train: ')}")
    if steps:
        last = steps[-1]
        facts.update(last_step=int(last.group(1)), max_steps=int(last.group(2)),
                     last_loss=float(last.group(3)), train_seconds=float(last.group(4).replace(",", "")))
        out.append(f"last step {facts['last_step']}/{facts['max_steps']}: loss {facts['last_loss']:.4f}, "
                   f"{facts['train_seconds']:.1f} s of training")
    out.append(f"final weights: {fmt(facts['final_weights'])}")
    return Summary("train_log", str(path), facts, out)


def _summarise_layer_error(path: Path, rows: list[dict]) -> Summary:
    """The quantize stage's per-matrix error plot data: the worst matrices first."""
    scored = [r for r in rows if isinstance(r.get("hessian_error"), (int, float))]
    worst = sorted(scored, key=lambda r: -r["hessian_error"])[:5]
    facts = {"matrices": len(rows), "worst": worst, "rows": rows,
             "hessian_error_total": sum(r["hessian_error"] for r in scored)}
    lines = [f"{len(rows)} block matrices, total Hessian-weighted error {fmt(facts['hessian_error_total'])}",
             "largest errors:", *table(["tensor", "hessian error", "weight mse"],
                                       [[r["tensor"], r["hessian_error"], r.get("weight_mse")] for r in worst])]
    return Summary("layer_error", str(path), facts, lines)


_STAGE_WARNING = re.compile(r"^(warning|error): ", re.IGNORECASE)
_PROGRESS = re.compile(r"^[^:\n]+: [\d,]+/[\d,]+ \S+ \(\d+%\)")


def summarise_stage_log(path: Path) -> Summary:
    """A StageLog file (hessians, quantize, eval_sliding, eval_ttt): its stage, last line, warnings, errors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: stage log is not UTF-8 ({one_line(exc)})") from None
    stage = STAGE_LOG_FIRST_LINE.match(lines[0]).group(1)
    flagged = [line for line in lines if _STAGE_WARNING.match(line)]
    progress = sum(1 for line in lines if _PROGRESS.match(line))
    last = next((line for line in reversed(lines) if line.strip() and not _PROGRESS.match(line)), lines[-1])
    facts = {"stage": stage, "lines": len(lines), "progress_lines": progress, "first_line": lines[0],
             "last_line": last, "warnings": [x for x in flagged if x.lower().startswith("warning")],
             "errors": [x for x in flagged if x.lower().startswith("error")]}
    out = [f"stage {stage}: {len(lines)} lines ({progress} progress lines)", f"first: {lines[0]}", f"last: {last}"]
    out += flagged
    return Summary("stage_log", str(path), facts, out)


def summarise_live_curve(path: Path) -> Summary:
    """One dvclive curve (``step<TAB>value`` rows): its name, steps and value range."""
    try:
        header, *body = path.read_text(encoding="utf-8").splitlines()
        name = header.split("\t")[1]
        rows = [(int(step), float(value)) for step, value in (line.split("\t") for line in body if line)]
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: not a step<TAB>value curve ({one_line(exc)})") from None
    facts: dict[str, Any] = {"metric": name, "points": len(rows)}
    out = [f"{name}: {len(rows)} points"]
    if rows:
        values = [v for _, v in rows]
        facts.update(first_step=rows[0][0], last_step=rows[-1][0], first=values[0], last=values[-1],
                     min=min(values), max=max(values))
        out.append(f"step {rows[0][0]} → {rows[-1][0]}: {fmt(values[0])} → {fmt(values[-1])} "
                   f"(min {fmt(min(values))}, max {fmt(max(values))})")
    return Summary("live_curve", str(path), facts, out)


def summarise_png(path: Path) -> Summary:
    """A plot the pipeline draws (loss.png, layer_error.png, running_bpb.png): its size in pixels."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise DataError(f"{path}: PNG without an IHDR header (truncated?)")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return Summary("plot_image", str(path), {"width": width, "height": height, "bytes": path.stat().st_size},
                   [f"{width}x{height} pixels, {path.stat().st_size:,} bytes"])


def summarise_bundle(path: Path) -> Summary:
    """Counted bytes (the file's size, as the challenge counts it), the archive's size and its modules."""
    from pgolf.submission.bundle import read_bundle
    index = read_bundle(path)
    files = index["files"]
    facts = {"counted_bytes": index["counted_bytes"], "raw_bytes": index["raw_bytes"], "driver": index["driver"],
             "sha256": index["sha256"], "num_modules": len(files), "modules": [f for f, _ in files],
             "params_sections": sorted(index["params"] or {})}
    out = [f"counted bytes {index['counted_bytes']:,} (archive {index['raw_bytes']:,} bytes uncompressed: "
           f"{len(files)} modules + params), driver {index['driver']}",
           f"sha256 {index['sha256']}",
           *table(["module", "bytes packed"], [[f, f"{n:,}"] for f, n in files])]
    return Summary("bundle", str(path), facts, out)
