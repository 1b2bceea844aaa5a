"""Compile warm-up of doc_lora's chunk forward (and its AdamW step) without a GPU: trace time by graph kind.

Builds the params profile's model (default f1855) and its per-document adapters, then times
:meth:`pgolf.eval.lora_forward.ChunkForward.warm_up` with a ``torch.compile`` backend: ``aot_eager``
(default) runs dynamo and AOT autograd but generates no code, so on a CPU it measures the tracing share
of the warm-up; ``inductor`` on a GPU measures all of it. ``--width-step 0`` is the one dynamic graph (rows
and width), a step ≥ the window gives one static graph per power-of-two width bucket.
``RowAdamW.step_rows`` over every adapter tensor (its own graph) is timed first, apart.

    python bench/doc_ttt_trace.py --width-step 0       # one dynamic graph
    python bench/doc_ttt_trace.py --width-step 4096    # static: buckets 64, 128, 256 at --seq-len 256
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402

from pgolf.config import from_params  # noqa: E402
from pgolf.eval.lora import BatchedLoRA, RowAdamW  # noqa: E402
from pgolf.eval.lora_forward import ChunkForward  # noqa: E402
from pgolf.eval.ttt import EvalTTTConfig  # noqa: E402
from pgolf.model.gpt import GPT, ModelConfig  # noqa: E402
from pgolf.tools.profiles import compose  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-profile", default="f1855")
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width-step", type=int, default=0, help="eval_ttt.compile_width_step")
    ap.add_argument("--seq-len", type=int, default=256, help="window length (small: the trace does not depend on it)")
    ap.add_argument("--rows", type=int, default=4, help="batch_docs")
    args = ap.parse_args()
    params = compose(args.params_profile)
    cfg = from_params(EvalTTTConfig, params, "eval_ttt")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_dict(params["model"])).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = BatchedLoRA(model, args.rows, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets), device)
    opt = RowAdamW(lora.parameters(), cfg.lr, (cfg.momentum, cfg.beta2), cfg.adam_eps, cfg.weight_decay)
    for p in lora.parameters():
        p.grad = torch.zeros_like(p)
    step = torch.compile(opt.step_rows, backend=args.backend, fullgraph=True, dynamic=False)
    step_s = timed(lambda: step(torch.zeros(args.rows, dtype=torch.bool, device=device)), device)[1]
    torch._dynamo.reset()
    forward = ChunkForward(model, lora, args.seq_len, args.width_step, args.backend)   # no step: timed above
    seconds = forward.warm_up([cfg.chunk_tokens], False)
    kind = "dynamic (rows, width)" if args.width_step <= 0 else "static"
    print(f"chunk forward + backward: {forward.graphs} {kind} graph(s) in {seconds:.1f} s; RowAdamW.step_rows "
          f"over {len(lora.parameters())} adapter tensors: {step_s:.1f} s ({args.backend}, {args.device})")


if __name__ == "__main__":
    main()
