"""The inductor lever of the training step (train.mix_order_reduction) and the lever table of
bench/train_throughput.py. Speed figures come from the bench, never from here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.config import from_params
from pgolf.precision import maybe_compile, training_compile_options
from pgolf.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
TRAIN = {"seed": 1, "seq_len": 16, "tokens_per_step": 64, "micro_batch_tokens": 32, "max_steps": 4,
         "max_train_seconds": 0.0, "warmdown": "steps", "warmdown_steps": 2, "warmdown_frac": 0.0,
         "compile": True, "compile_warmup_steps": 0, "mix_order_reduction": False, "min_lr_scale": 0.0,
         "recur_start_frac": 0.0, "compile_mode": "default",
         "seq_len_schedule": [], "packed_rows": False, "seq_change_warmup_steps": 0,
         "qat_lr_scale_threshold": 0.0, "holdout_tokens": 17, "final_weights": "live",
         "resume_every": 0, "log_every": 1}


def test_options_name_a_real_inductor_setting():
    import torch._inductor.config as inductor_config
    assert training_compile_options(True) == {}
    (key, value), = training_compile_options(False).items()
    section, name = key.split(".")
    # a torch upgrade that renames the knob must fail here, not silently compile the default
    assert hasattr(getattr(inductor_config, section), name) and value is False


def test_maybe_compile_passes_options_only_when_given(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    fn = lambda x: x  # noqa: E731
    assert maybe_compile(fn, False, {"triton.mix_order_reduction": False}) is fn and calls == []
    maybe_compile(fn, True, {})
    maybe_compile(fn, True, {"triton.mix_order_reduction": False})
    assert calls == [{"dynamic": False, "fullgraph": True},
                     {"dynamic": False, "fullgraph": True, "options": {"triton.mix_order_reduction": False}}]


def test_train_config_requires_the_key():
    cfg = from_params(TrainConfig, {"train": TRAIN}, "train")
    assert cfg.mix_order_reduction is False
    with pytest.raises(Exception, match="mix_order_reduction"):
        from_params(TrainConfig, {"train": {k: v for k, v in TRAIN.items() if k != "mix_order_reduction"}},
                    "train")
    with pytest.raises(Exception, match="mix_order_reduction"):
        from_params(TrainConfig, {"train": {**TRAIN, "mix_order_reduction": "no"}}, "train")


@pytest.mark.slow
def test_lever_table_reads_results_side_by_side(tmp_path):
    def result(name, ms):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"ms_per_step_median": ms, "tokens_per_s": 786_432 / (ms / 1000),
                                    "mfu": 0.38 * 598.0 / ms, "peak_memory_bytes": 22 * 2**30}))
        return f"{name}={path}"
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--table", result("base", 598.0),
                           result("lever", 570.0)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[2].startswith("| base | 598.0 | 1,315,104 | 38.0 % | 22.0 GiB | 1.000x |")
    assert lines[3].startswith("| lever | 570.0 | 1,379,705 | 39.9 % | 22.0 GiB | 1.049x |")


@pytest.mark.gpu
def test_switching_the_lever_keeps_the_numerics():
    """One compiled training micro-step with and without mixed-order reduction: same loss and
    gradients within bf16 autocast tolerance (the lever only changes kernel fusion)."""
    from pgolf.model.gpt import GPT, ModelConfig
    from pgolf.tools.profiles import compose
    model_cfg = from_params(ModelConfig, compose("cpu"), "model")  # the CPU default model, on the GPU
    torch.manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (4, 256), device="cuda")
    results = []
    for mix in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(model_cfg).cuda()
        step = maybe_compile(model, True, training_compile_options(mix))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-3, atol=1e-3)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=2e-2, atol=2e-3, msg=name)


def test_compile_modes_are_torchs_own_option_sets():
    """train.compile_mode: each mode's options are exactly those torch.compile(mode=...) would set,
    composed with the mixed-order override; an unknown mode is one ParamError."""
    from torch._inductor import list_mode_options
    from pgolf.precision import COMPILE_MODES
    for mode, options in COMPILE_MODES.items():
        assert options == list_mode_options(mode), mode
    assert training_compile_options(False, "reduce-overhead") == {"triton.cudagraphs": True,
                                                                   "triton.mix_order_reduction": False}
    assert training_compile_options(True, "default") == {}
    assert from_params(TrainConfig, {"train": {**TRAIN, "compile_mode": "reduce-overhead"}},
                       "train").compile_mode == "reduce-overhead"
    with pytest.raises(Exception, match="compile_mode"):
        from_params(TrainConfig, {"train": {**TRAIN, "compile_mode": "fast"}}, "train")


@pytest.mark.gpu
def test_cuda_graph_steps_accumulate_gradients_like_the_plain_compiled_steps(tmp_path):
    """train.compile_mode=reduce-overhead with 2 micro-steps per step: the per-step losses follow the
    default compiled step's within bf16 noise (a gradient overwritten by the next replay would not)."""
    import numpy as np
    from pgolf.data.loader import TokenStream
    from pgolf.data.shards import write_shard
    from pgolf.distributed import init_distributed
    from pgolf.model.config import ModelConfig
    from pgolf.quant.grid import GridBits
    from pgolf.tools.profiles import compose
    from pgolf.train.loop import Trainer
    from pgolf.train.optim import OptimConfig
    p = compose("cpu")
    model_cfg, optim_cfg = from_params(ModelConfig, p, "model"), from_params(OptimConfig, p, "optim")
    write_shard(tmp_path / "train_000000.bin",
                np.random.default_rng(0).integers(0, model_cfg.vocab_size, 20_000, dtype=np.uint16))
    ctx = init_distributed(0, 1, 0, "cuda")
    curves = []
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        cfg = from_params(TrainConfig, {"train": {**TRAIN, "seq_len": 128, "tokens_per_step": 1024,
                                                  "micro_batch_tokens": 512, "holdout_tokens": 129,
                                                  "compile_mode": mode}}, "train")
        trainer = Trainer(model_cfg, optim_cfg, cfg, GridBits(attn_bits=6, mlp_bits=6), ctx,
                          TokenStream([tmp_path / "train_000000.bin"], model_cfg.vocab_size))
        assert trainer.accum == 2 and trainer.cuda_graphs == (mode == "reduce-overhead")
        curves.append([float(trainer.train_step(1.0, i)[0]) for i in range(4)])
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=0, atol=2e-2)


@pytest.mark.slow
def test_throughput_bench_runs_a_tiny_step_on_cpu(tmp_path):
    """The bench builds its train section from the current TrainConfig (a new train key once broke it on the GPU)."""
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--shape", "tiny", "--device", "cpu",
                           "--no-compile", "--steps", "1", "--warmup-steps", "0", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 1 and result["tokens_per_s"] > 0
