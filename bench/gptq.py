"""Benchmark: Hessian collection and full GPTQ at the record's shapes.

    python bench/gptq.py OUT.json [--device auto] [--calib-seqs 16] [--seq-len 2048]

1. Hessian collection: PR #960's GPT (conf/model/r960.yaml: 11 layers, d=512,
   VRL, VE, XSA, BigramHash 3072; random weights) runs ``--calib-seqs`` random sequences
   through :func:`pgolf.quant.hessians.collect_hessians` (bf16 autocast on CUDA).
2. GPTQ: the 66 block matrices (11 × Q 512², K/V 256×512, O 512², up
   1536×512, down 512×1536), random weights with heavy tails and random but
   correlated Hessians, through :func:`pgolf.quant.policy.quantize_state_dict`
   with the record settings (λ 0.01, block 128, act-order, 5 clip candidates).
3. Optionally (``--compress``) the time and size of encoding those matrices
   with lzma-9 and zstd-22.

Each timed part runs once untimed first (CUDA start-up, cuBLAS plans).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402

import pgolf.quant.hessians as hessians_mod  # noqa: E402
from pgolf.quant.artifact import encode  # noqa: E402
from pgolf.distributed import resolve_device  # noqa: E402
from pgolf.quant.hessians import collect_hessians  # noqa: E402
from pgolf.quant.hessian_file import hessian_key_for_weight  # noqa: E402
from pgolf.model.gpt import GPT, ModelConfig  # noqa: E402
from pgolf.model.layout import BLOCK_MATRICES, first_reader, hessian_key, weight_name  # noqa: E402
from pgolf.precision import autocast  # noqa: E402
from pgolf.quant.policy import QuantizeConfig, quantize_state_dict  # noqa: E402
from pgolf.tools.profiles import model_preset  # noqa: E402

# PR #960's model (conf/model/r960.yaml, the record profile's); "auto" lets PyTorch pick the kernel.
RECORD_MODEL = {**model_preset("r960"), "attention_backend": "auto"}
RECORD_QUANT = QuantizeConfig(
    method="gptq", damp=0.01, block_size=128, act_order=True,
    clip_candidates=(0.999, 0.9995, 0.9999, 0.99999, 1.0), clip_metric="weight_mse", attn_bits=6,
    mlp_bits=6, embed_bits=8, embed_clip_quantile=0.9999984, passthrough_numel=65536,
    compressor="lzma", zstd_level=22, lzma_preset=9, prune=False, prune_margin_bytes=0)


def bench_hessians(device: torch.device, num_seqs: int, seq_len: int, batch_seqs: int) -> dict:
    torch.manual_seed(0)
    with device:
        model = GPT(ModelConfig.from_dict(RECORD_MODEL))
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised O/down banks too
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(1024, (min(batch_seqs, num_seqs - i), seq_len), generator=g, device=device)
               for i in range(0, num_seqs, batch_seqs)]
    def forward_only() -> None:
        with torch.no_grad(), autocast(device):
            for ids in batches:
                model.forward_logits(ids)

    collect_hessians(model, batches[:1], device, lambda: autocast(device))  # warm-up
    _, forward_seconds = timed(forward_only, device)
    hs, seconds = timed(lambda: collect_hessians(model, batches, device, lambda: autocast(device)), device)
    return {"seconds": round(seconds, 3), "forward_only_seconds": round(forward_seconds, 3),
            "num_sequences": hs.num_sequences, "tokens": hs.num_tokens,
            "tokens_per_s": round(hs.num_tokens / seconds), "matrices": len(hs.hessians),
            "parameters": model.num_parameters()}


def float64_second_moment(flat: torch.Tensor) -> torch.Tensor:
    """The plain float64 product, for comparison with the 16-bit fast path."""
    wide = flat.to(torch.float64)
    return wide.T @ wide


def record_matrices(device: torch.device) -> tuple[dict, dict]:
    """The 66 block matrices (heavy-tailed random weights) and correlated Hessians."""
    g = torch.Generator(device=device).manual_seed(1)
    cfg = ModelConfig.from_dict(RECORD_MODEL)
    state, hessians = {}, {}
    for i in range(cfg.num_layers):
        for matrix in BLOCK_MATRICES:
            shape = (getattr(cfg, matrix.rows), getattr(cfg, matrix.cols))
            w = torch.randn(shape, generator=g, device=device) * 0.02
            w *= torch.exp(0.5 * torch.randn(shape, generator=g, device=device))
            state[weight_name(i, matrix)] = w
        for matrix in (m for m in BLOCK_MATRICES if first_reader(m) is m):  # one Hessian per input
            width = getattr(cfg, matrix.cols)
            mix = torch.randn(width, width, generator=g, device=device) / width ** 0.5
            mix += torch.eye(width, device=device)
            scale = torch.exp(torch.randn(width, generator=g, device=device))  # uneven feature energy
            hessians[hessian_key(i, matrix)] = 4096 * (mix * scale).T @ (mix * scale)
    assert all(hessian_key_for_weight(n) in hessians for n in state)
    return state, hessians


def bench_gptq(device: torch.device, compress: bool) -> dict:
    state, hessians = record_matrices(device)
    run = lambda: quantize_state_dict(state, hessians, 4096, RECORD_QUANT, device)  # noqa: E731
    run()  # warm-up
    result, seconds = timed(run, device)
    out = {"seconds": round(seconds, 3), "matrices": len(result.tensors),
           "values": sum(t.numel() for t in state.values()), "fallbacks": result.fallbacks,
           "weight_mse_mean": sum(r["weight_mse"] for r in result.report) / len(result.report)}
    if compress:
        for comp, level in (("lzma", 9), ("zstd", 22)):
            blob, secs = timed(lambda: encode(result.tensors, {}, {}, comp, level), torch.device("cpu"))
            out[f"{comp}{level}"] = {"seconds": round(secs, 2), "bytes": len(blob)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file for the results")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences (R1060: 64 x 48 per rank)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    parser.add_argument("--batch-seqs", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--compress", action="store_true", help="also time lzma-9 / zstd-22 encoding")
    parser.add_argument("--skip-hessians", action="store_true")
    parser.add_argument("--float64-products", action="store_true",
                        help="collect with float64 GEMMs even for bf16 activations (for comparison)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if args.float64_products:
        hessians_mod.batch_second_moment = float64_second_moment
        results["hessian_products"] = "float64"
    if not args.skip_hessians:
        results["hessians"] = bench_hessians(device, args.calib_seqs, args.seq_len, args.batch_seqs)
        print(f"hessians: {results['hessians']}", flush=True)
    results["gptq"] = bench_gptq(device, args.compress)
    print(f"gptq: {results['gptq']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
