"""`pgolf export --out DIR`: a challenge records folder from the pipeline's outputs.

The folder holds::

    train_gpt.py      the bundle (pgolf/submission/bundle.py): all the counted code and the params;
                      run there with the challenge's data layout, it redoes the whole run
    README.md         recipe, params that differ from the record profile, results per seed, bytes
    submission.json   exactly the challenge's fields (CHALLENGE_FIELDS: those of the challenge's
                      example run, records/track_10min_16mb/2026-03-17_NaiveBaseline/submission.json)
    pgolf_results.json  the same and every other figure, for machines (pgolf inspect reads it)
    requirements.txt  the third-party packages train_gpt.py imports
    model.ptz         the quantised artifact that was scored (its sha256 is in submission.json)
    logs/STAGE/...    every *.log under artifacts/: a stage's own logs by their path under its folder
                      (logs/train/train.log), torchrun's launcher log of a stage as logs/STAGE/launcher.log
    params.yaml       the parameters, and dvc.lock when present (the exact recorded run)

The headline score is the legal TTT eval when it ran, else the sliding-window
eval (docs/RECIPE.md §5: the last eval that runs). Export refuses, writing
nothing, when a required input is missing, when any result it reads was
computed from another artifact or bundle than today's (pgolf/submission/provenance.py),
or when size.json says ``fits: false`` unless ``allow_over_limit``. The folder
is built in a temporary directory and renamed into place; an existing ``--out``
is replaced only if it is empty or an earlier export.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pgolf.errors import DataError, PgolfError
from pgolf.pipeline.paths import (ARTIFACT, BUDGET_JSON, BUNDLE, BUNDLE_METRICS, EVAL_SLIDING_DIR, EVAL_TTT_DIR,
                                  LAUNCH_LOG_DIR, PARAMS, QUANT_DIR, SIZE_JSON, TRAIN_DIR)

BUDGET = BUDGET_JSON
SLIDING_METRICS = EVAL_SLIDING_DIR / "metrics.json"
TTT_METRICS = EVAL_TTT_DIR / "metrics.json"
TRAIN_METRICS = TRAIN_DIR / "metrics.json"
QUANT_METRICS = QUANT_DIR / "metrics.json"
DVC_LOCK = Path("dvc.lock")
LOGS_UNDER = Path("artifacts")
# submission.json's keys, in order: those of the challenge's example run (openai/parameter-golf
# records/track_10min_16mb/2026-03-17_NaiveBaseline/submission.json); the challenge reads these.
CHALLENGE_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code")
RESULTS = "pgolf_results.json"  # not results.json: a run of train_gpt.py in the folder writes that one
REQUIRED = (ARTIFACT, BUNDLE, BUNDLE_METRICS, SIZE_JSON, SLIDING_METRICS, TRAIN_METRICS, PARAMS)


def _read_json(path: Path) -> dict:
    from pgolf.tools.run_metrics import read_metrics_file
    return read_metrics_file(path)


def _number(data: dict, key: str, where: Path, kind: type = float) -> Any:
    """``data[key]`` as a number of ``kind``; DataError naming the file and key otherwise."""
    value = data.get(key)
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise DataError(f"{where}: key '{key}' missing or not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _optional(data: dict | None, key: str) -> Any:
    return None if data is None else data.get(key)


def git_commit(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, working tree has uncommitted changes) or (None, None) outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def _params_summary(root: Path, model_config: dict, quant_meta: dict, num_parameters: int) -> dict:
    from pgolf.config import load_params
    params = load_params(root / PARAMS)

    def section(name: str) -> dict:
        value = params.get(name)
        return value if isinstance(value, dict) else {}

    model_keys = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult")
    quant_keys = ("method", "attn_bits", "mlp_bits", "embed_bits", "compressor", "zstd_level", "lzma_preset",
                  "prune")
    return {"seeds": {"train": section("train").get("seed"), "corpus": section("corpus").get("seed"),
                      "hessians": section("hessians").get("seed")},
            "model": {k: model_config.get(k) for k in model_keys},
            "num_parameters": num_parameters,
            "quantize": {k: quant_meta.get(k) for k in quant_keys},
            "hessian_source": section("hessians").get("source"),
            "tokenizer_vocab": section("tokenizer").get("vocab_size")}


def collect_submission(root: Path, allow_over_limit: bool = False, prequant_metrics: Path | None = None,
                       now: datetime.datetime | None = None, author: str | None = None,
                       github_id: str | None = None) -> dict:
    """pgolf_results.json's content (submission.json's fields first), after every check export makes."""
    from pgolf import __version__
    from pgolf.quant.artifact import read_artifact

    from pgolf.config import load_params
    from pgolf.submission.provenance import check_bundle, check_computed_from, check_size_report
    from pgolf.submission.size import file_sha256

    missing = [p for p in REQUIRED if not (root / p).is_file()]
    if missing:
        raise DataError(f"{root / missing[0]}: required input missing (run the pipeline: dvc repro)")
    artifact_sha = file_sha256(root / ARTIFACT)
    size = _read_json(root / SIZE_JSON)
    check_size_report(root, size, root / ARTIFACT, artifact_sha)
    bundle = check_bundle(root, _read_json(root / BUNDLE_METRICS), load_params(root / PARAMS))
    if not size["fits"] and not allow_over_limit:
        raise PgolfError(f"{root / SIZE_JSON}: submission is {size['total_bytes']:,} bytes, over the "
                         f"{size['limit']:,}-byte limit by {size['total_bytes'] - size['limit']:,}; not exporting "
                         "(pass --allow-over-limit to export it marked as over the limit)")
    artifact = read_artifact(root / ARTIFACT)
    num_parameters = sum(_numel(t.shape) for t in artifact.tensors)
    quant_meta = artifact.meta.get("quantize") if isinstance(artifact.meta.get("quantize"), dict) else {}

    sliding = _read_json(root / SLIDING_METRICS)
    ttt = _read_json(root / TTT_METRICS) if (root / TTT_METRICS).is_file() else None
    budget = _read_json(root / BUDGET) if (root / BUDGET).is_file() else None
    for path, data, stage in ((SLIDING_METRICS, sliding, "eval_sliding"), (TTT_METRICS, ttt, "eval_ttt"),
                              (BUDGET, budget, "budget")):
        if data is not None:  # a present result must be today's, never skipped for being stale
            check_computed_from(root / path, data, "artifact_sha256", artifact_sha, root / ARTIFACT, stage)
    train = _read_json(root / TRAIN_METRICS)
    quant = _read_json(root / QUANT_METRICS) if (root / QUANT_METRICS).is_file() else None
    sliding_bpb = _number(sliding, "val_bpb", root / SLIDING_METRICS)
    sliding_loss = _number(sliding, "val_loss", root / SLIDING_METRICS)
    ttt_bpb = _number(ttt, "val_bpb", root / TTT_METRICS) if ttt is not None else None
    ttt_loss = _number(ttt, "val_loss", root / TTT_METRICS) if ttt is not None else None
    gap = None
    if prequant_metrics is not None:
        gap = sliding_bpb - _number(_read_json(prequant_metrics), "val_bpb", prequant_metrics)
    commit, dirty = git_commit(root)
    summary = _params_summary(root, artifact.model_config, quant_meta, num_parameters)
    headline_bpb = ttt_bpb if ttt is not None else sliding_bpb
    headline_loss = ttt_loss if ttt is not None else sliding_loss
    return {
        # The challenge's fields first (author and github_id from --author / --github-id).
        "author": author, "github_id": github_id,
        "name": f"pgolf {summary['model']['num_layers']}L{summary['model']['model_dim']}d "
                f"{summary['quantize']['method']} + {'legal TTT' if ttt is not None else 'sliding eval'}",
        "blurb": (f"pgolf pipeline: {num_parameters:,} parameters, {_number(train, 'steps', root / TRAIN_METRICS, int):,} "
                  f"steps, GPTQ {', '.join(bits_histogram(artifact.tensors))}, "
                  f"{'legal score-first TTT' if ttt is not None else 'sliding-window eval'}; "
                  f"all code in a {size['code_bytes']:,}-byte self-extracting train_gpt.py"),
        "date": (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "val_loss": headline_loss, "val_bpb": headline_bpb,
        "bytes_total": size["total_bytes"], "bytes_code": size["code_bytes"],
        "headline_eval": "ttt" if ttt is not None else "sliding",
        "val_bpb_sliding": sliding_bpb, "val_loss_sliding": sliding_loss,
        "val_bpb_ttt": ttt_bpb, "val_loss_ttt": ttt_loss,
        "val_bpb_nonoverlap": _optional(sliding, "nonoverlap_val_bpb"),
        "quantization_gap_bpb": gap,
        "quantization_weight_mse_mean": _optional(quant, "weight_mse_mean"),
        "bytes_model": size["model_bytes"], "bytes_limit": size["limit"], "fits": size["fits"],
        "artifact_sha256": artifact_sha, "bundle_sha256": bundle["sha256"],
        "bundle_modules": len(bundle["files"]), "bundle_raw_bytes": bundle["raw_bytes"],
        "budget": budget,
        "steps": _number(train, "steps", root / TRAIN_METRICS, int),
        "train_seconds": _number(train, "train_seconds", root / TRAIN_METRICS),
        "ms_per_step": _optional(train, "ms_per_step"), "train_tokens": _optional(train, "tokens"),
        "final_weights": _optional(train, "final_weights"),
        "train_world_size": _optional(train, "world_size"),
        "eval_world_size": _optional(sliding, "world_size"),
        **summary,
        "params_vs_record": params_vs_record(load_params(root / PARAMS)),
        # What the artifact stores, which differs from the configured bits after fit_to_limit.
        "quantized_bits": bits_histogram(artifact.tensors),
        "pgolf_version": __version__, "git_commit": commit, "git_dirty": dirty,
    }


def params_vs_record(params: dict) -> list[dict[str, Any]]:
    """Every leaf param whose value differs from the record profile's: [{key, value, record}]."""
    from pgolf.tools.profiles import compose
    record = compose("record")
    rows = []
    for section in sorted(set(params) | set(record)):
        ours, theirs = params.get(section), record.get(section)
        if not isinstance(ours, dict) or not isinstance(theirs, dict):
            if ours != theirs:
                rows.append({"key": section, "value": ours, "record": theirs})
            continue
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                rows.append({"key": f"{section}.{key}", "value": ours.get(key), "record": theirs.get(key)})
    return rows


def bits_histogram(tensors) -> dict[str, int]:
    """{"int6": n, "int5": m, ...}: how many stored tensors use each integer width."""
    counts: dict[str, int] = {}
    for t in tensors:
        if t.quantized:
            counts[f"int{t.bits}"] = counts.get(f"int{t.bits}", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -int(kv[0][3:])))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _f(value: Any, digits: int = 8) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_readme(s: dict) -> str:
    """README.md: the results table and what the folder holds."""
    over = s["bytes_total"] - s["bytes_limit"]
    verdict = f"fits, headroom {-over:,}" if s["fits"] else f"**OVER THE LIMIT by {over:,}**"
    ttt = (f"{_f(s['val_bpb_ttt'])} (gain {s['val_bpb_sliding'] - s['val_bpb_ttt']:+.6f} vs sliding)"
           if s["val_bpb_ttt"] is not None else "not run")
    q = s["quantize"]
    level = q.get("zstd_level") if q.get("compressor") == "zstd" else q.get("lzma_preset")
    stored = ", ".join(f"{n} × {bits}" for bits, n in s.get("quantized_bits", {}).items())
    quant = (f"{q.get('method')}: attn int{q.get('attn_bits')}, MLP int{q.get('mlp_bits')}, "
             f"embeddings int{q.get('embed_bits')}; {q.get('compressor')} level {level}; "
             f"stored tensors: {stored or 'none quantised'}")
    if s["quantization_weight_mse_mean"] is not None:
        quant += f"; mean weight MSE {s['quantization_weight_mse_mean']:.3g}"
    gap = (f"{s['quantization_gap_bpb']:+.6f} bpb (quantised − unquantised, sliding eval)"
           if s["quantization_gap_bpb"] is not None else "n/a (no unquantised eval given)")
    ms = f", {s['ms_per_step']:.1f} ms/step" if isinstance(s["ms_per_step"], (int, float)) else ""
    m = s["model"]
    rows = [
        ("val_bpb, headline", f"**{_f(s['val_bpb'])}** ({s['headline_eval']})"),
        ("val_bpb, sliding window", _f(s["val_bpb_sliding"])),
        ("val_bpb, legal score-first TTT", ttt),
        ("val_loss (headline, nats/token)", _f(s["val_loss"])),
        ("artifact bytes", f"code {s['bytes_code']:,} + model {s['bytes_model']:,} = {s['bytes_total']:,} "
                           f"of {s['bytes_limit']:,} ({verdict})"),
        ("training", f"{s['steps']:,} steps in {s['train_seconds']:.1f} s{ms}; final weights "
                     f"{s['final_weights'] or 'n/a'}"),
        ("model", f"{m.get('num_layers')} layers, dim {m.get('model_dim')}, {m.get('num_heads')} heads "
                  f"({m.get('num_kv_heads')} KV), vocab {m.get('vocab_size')}; {s['num_parameters']:,} parameters"),
        ("quantisation", quant),
        ("quantisation gap", gap),
        ("seeds", ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in s["seeds"].items())),
    ]
    commit = s["git_commit"] or "unknown (not a git checkout)"
    if s["git_dirty"]:
        commit += " (with uncommitted changes)"
    seed = s["seeds"]["train"]
    diffs = s.get("params_vs_record") or []
    lines = [f"# pgolf submission: val_bpb {_f(s['val_bpb'])}", "",
             f"Exported {s['date']} by pgolf {s['pgolf_version']} from commit {commit}.", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Recipe", "",
             "Trained, calibrated, quantised and evaluated by the pgolf pipeline (corpus → tokenizer → shards → "
             "train → hessians → quantize → size_check → eval_sliding → eval_ttt): the record stack of "
             "docs/RECIPE.md (U-Net GPT with XSA, value embeddings, SmearGate, BigramHash, VRL; Muon + Adam; "
             "EMA/SWA; late QAT), full-Hessian GPTQ with selective pruning / bit demotion to the byte limit, "
             "and legal score-first TTT.", "",
             "## Results per seed", "",
             "| train seed | val_bpb sliding | val_bpb TTT | bytes total | artifact sha256 |", "|---|---|---|---|---|",
             f"| {seed} | {_f(s['val_bpb_sliding'])} | {_f(s['val_bpb_ttt'])} | {s['bytes_total']:,} | "
             f"`{s['artifact_sha256'][:16]}` |", "",
             "## Counted bytes", "",
             f"`train_gpt.py` is {s['bytes_code']:,} bytes (the challenge's count: its UTF-8 length): a decoder stub "
             f"and {s['bundle_modules']} pgolf modules plus the resolved params, {s['bundle_raw_bytes']:,} bytes "
             f"uncompressed, minified, raw LZMA2 + base-124 ASCII. The model is {s['bytes_model']:,} bytes; total {s['bytes_total']:,}.", "",
             *budget_readme_lines(s.get("budget")),
             "## Params that differ from the record profile", "",
             *(["| key | this run | record |", "|---|---|---|",
                *[f"| `{d['key']}` | `{d['value']}` | `{d['record']}` |" for d in diffs]]
               if diffs else ["None: this run is the record profile."]), "",
             "## Files", "",
             "- `train_gpt.py`: the whole run; `torchrun --standalone --nproc_per_node=8 train_gpt.py` in a "
             "records folder with the challenge's data layout (`python train_gpt.py --unpack DIR` shows the sources)",
             "- `requirements.txt`: the third-party packages it imports",
             "- `model.ptz`: the quantised artifact every score above was computed on (sha256 in pgolf_results.json)",
             "- `logs/STAGE/`: the pipeline's logs (train, hessians, quantize, evals) and torchrun's launcher log "
             "of each distributed stage (`launcher.log`)",
             "- `params.yaml` (and `dvc.lock` when present): the exact parameters of the run",
             "- `submission.json`: the challenge's fields; `pgolf_results.json`: every number above, for machines", "",
             "## Reproduce", "",
             "Run `train_gpt.py` as above, or check out the commit above, put `params.yaml` in the repository "
             "root and run `dvc repro`.", ""]
    return "\n".join(lines)


def budget_readme_lines(budget: dict | None) -> list[str]:
    if budget is None:
        return ["The time budgets were not measured (run the budget stage).", ""]
    from pgolf.submission.budget import budget_lines
    return ["## Time budgets", "", *[f"- {line}" for line in budget_lines(budget)], ""]


def exported_logs(root: Path, out: Path) -> dict[Path, Path]:
    """{log under root: its path in the export folder} for every *.log under artifacts/ (module docstring)."""
    out_r = out.resolve()
    found = sorted(p for p in (root / LOGS_UNDER).rglob("*.log") if p.is_file() and out_r not in p.resolve().parents)
    placed: dict[Path, Path] = {}
    for log in found:
        launcher = log.parent == root / LAUNCH_LOG_DIR
        dest = Path("logs") / (Path(log.stem, "launcher.log") if launcher else log.relative_to(root / LOGS_UNDER))
        if dest in placed.values():
            raise DataError(f"{log}: would be exported as {dest}, like another log; rename one")
        placed[log] = dest
    return placed


def _check_out_dir(out: Path, root: Path) -> None:
    """Refuse an ``out`` that holds the inputs, or a non-empty folder that is not an earlier export."""
    out_r, root_r = out.resolve(), root.resolve()
    if out_r == root_r or out_r in root_r.parents:
        raise PgolfError(f"{out}: contains the pipeline's own files; choose another --out")
    if out.exists() and not out.is_dir():
        raise PgolfError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / RESULTS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "pgolf_version" in earlier):
            raise PgolfError(f"{out}: exists, is not empty and is not an earlier pgolf export; "
                             "choose another --out")


def export_submission(root: Path, out: Path, allow_over_limit: bool = False,
                      prequant_metrics: Path | None = None, author: str | None = None,
                      github_id: str | None = None) -> dict:
    """Write the submission folder ``out`` from the outputs under ``root``; return pgolf_results.json."""
    from pgolf.io import atomic_dir

    _check_out_dir(out, root)
    submission = collect_submission(root, allow_over_limit, prequant_metrics, author=author, github_id=github_id)
    logs = exported_logs(root, out)
    with atomic_dir(out) as tmp:
        shutil.copyfile(root / ARTIFACT, tmp / "model.ptz")
        shutil.copyfile(root / PARAMS, tmp / "params.yaml")
        if (root / DVC_LOCK).is_file():
            shutil.copyfile(root / DVC_LOCK, tmp / "dvc.lock")
        from pgolf.submission.bundle import requirements
        shutil.copyfile(root / BUNDLE, tmp / "train_gpt.py")
        (tmp / "requirements.txt").write_text(requirements(root / BUNDLE), encoding="utf-8")
        for log, dest in logs.items():
            (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, tmp / dest)
        submission["files"] = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        submission["files"] += ["README.md", "submission.json", RESULTS]
        challenge = {key: submission[key] for key in CHALLENGE_FIELDS}
        (tmp / "submission.json").write_text(json.dumps(challenge, indent=2) + "\n", encoding="utf-8")
        (tmp / RESULTS).write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(render_readme(submission), encoding="utf-8")
    return submission


def run_export(args: argparse.Namespace) -> int:
    s = export_submission(Path(args.root), Path(args.out), args.allow_over_limit,
                          Path(args.prequant_metrics) if args.prequant_metrics else None,
                          author=args.author, github_id=args.github_id)
    status = "fits" if s["fits"] else "OVER THE LIMIT"
    print(f"export: {args.out}: val_bpb {s['val_bpb']:.8f} ({s['headline_eval']}), {s['bytes_total']:,} bytes "
          f"({status}), {len(s['files'])} files")
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="write a challenge-style submission folder")
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--root", default=".", help="pipeline root holding artifacts/ and params.yaml (default .)")
    parser.add_argument("--allow-over-limit", action="store_true",
                        help="export even when size.json says fits: false (marked as over the limit)")
    parser.add_argument("--prequant-metrics", default=None,
                        help="metrics JSON with the val_bpb of the unquantised model under the same "
                             "sliding eval; gives the quantisation gap")
    parser.add_argument("--author", default=None, help="submission.json author (default null)")
    parser.add_argument("--github-id", default=None, help="submission.json github_id (default null)")
    parser.set_defaults(func=run_export)
