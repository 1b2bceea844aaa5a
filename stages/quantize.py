"""Stage quantize: trained weights + Hessians → artifacts/quant/{model.ptz,report.json,metrics.json}.

Also layer_error.{json,png} (the error of each quantised block matrix, a DVC
plot and its offline picture) and quantize.log. The work, byte target
included, is :func:`pgolf.quant.pipeline.quantize_checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.distributed import resolve_device
from pgolf.io import write_bytes_atomic, write_json_atomic
from pgolf.progress import StageLog
from pgolf.quant.pipeline import layer_error_rows, quantize_checkpoint
from pgolf.quant.policy import QuantizeConfig
from pgolf.tools.plots import plot_bars
from pgolf.pipeline.launch import launch_device, params, stage_main

CHECKPOINT = Path("artifacts/train/model.pt")
HESSIANS = Path("artifacts/hessians/hessians.pt")
OUT_DIR = Path("artifacts/quant")
LOG = OUT_DIR / "quantize.log"


def run(p: dict, root: Path = Path(".")) -> dict:
    """Quantise the checkpoint under ``root``; return the metrics."""
    cfg = from_params(QuantizeConfig, p, "quantize")
    device = resolve_device(launch_device(p))
    with StageLog(root / LOG) as log:
        outcome = quantize_checkpoint(root / CHECKPOINT, root / HESSIANS, cfg, device, root, log)
        write_bytes_atomic(root / OUT_DIR / "model.ptz", outcome.blob)
        write_json_atomic(root / OUT_DIR / "report.json", outcome.report)
        write_layer_error(root / OUT_DIR, outcome.report)
        write_json_atomic(root / OUT_DIR / "metrics.json", outcome.metrics)
        log.line(summary(outcome.metrics))
    return outcome.metrics


def write_layer_error(out_dir: Path, report: list[dict]) -> None:
    """layer_error.json (the DVC plot) and layer_error.png: one entry per quantised block matrix."""
    rows = layer_error_rows(report)
    write_json_atomic(out_dir / "layer_error.json", rows)
    # The output error per token when every matrix has a Hessian: what GPTQ minimises.
    key = "hessian_error" if rows and all(r["hessian_error"] is not None for r in rows) else "weight_mse"
    plot_bars(out_dir / "layer_error.png", [r["tensor"].removesuffix(".weight") for r in rows],
              [r[key] for r in rows], f"quantisation error per block matrix ({key})",
              "tr((W-Q)H(W-Q)^T) / tokens" if key == "hessian_error" else "mean (W-Q)^2")


def summary(m: dict) -> str:
    return (f"quantize: {m['num_quantized']}/{m['num_tensors']} tensors quantised, artifact "
            f"{m['model_bytes']:,} bytes in {m['seconds']:.1f} s; fallbacks: "
            f"{m['fallback_more_damping']} more damping, {m['fallback_round_to_nearest']} round-to-nearest")


@stage_main
def main() -> None:
    run(params())  # logs the summary line


if __name__ == "__main__":
    main()
