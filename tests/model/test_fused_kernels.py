"""model.fused_mlp and model.fused_loss: the ops' math against plain float64 references (CPU,
the torch formulas the Triton kernels share), their autograd, their compile wiring, and the
dispatch (off = today's ops exactly). The Triton kernels themselves: test_fused_kernels_triton.py
(interpreter) and the gpu-marked tests at the end (bf16 on CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf.model import fused_loss, fused_mlp as fused_mlp_module
from pgolf.model.fused_loss import rows_backward_reference, rows_forward_reference, softcap_token_nll
from pgolf.model.fused_mlp import fused_mlp
from pgolf.model.gpt import GPT
from tests.helpers import tiny_model_config

F64 = torch.float64


def plain_mlp(x, w_up, w_down, slope):
    """The activation written out: max(u, 0)² + slope²·min(u, 0)²."""
    u = x @ w_up.t()
    return (torch.clamp(u, min=0).square() + slope ** 2 * torch.clamp(u, max=0).square()) @ w_down.t()


def plain_softcap_nll(x, weight, targets, cap):
    """−log softmax(c·tanh(x Wᵀ / c))[target], written out with exp and log."""
    logits = x @ weight.t()
    z = cap * torch.tanh(logits / cap) if cap > 0 else logits
    z = z - z.max(dim=-1, keepdim=True).values
    log_probs = z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))
    return -log_probs.gather(-1, targets[..., None]).squeeze(-1)


def leaves(*shapes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_() for s in shapes]


def grads_of(fn, tensors, upstream):
    out = fn(*tensors)
    (out * upstream).sum().backward()
    result = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), result


# ------------------------------------------------------------------ fused MLP
@pytest.mark.parametrize("slope", [0.5, 0.0, 1.0])
def test_fused_mlp_forward_and_backward_match_float64_reference(slope):
    x, w_up, w_down = leaves((2, 7, 8), (12, 8), (8, 12), seed=1)
    upstream = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    got, got_grads = grads_of(lambda a, b, c: fused_mlp(a, b, c, slope), [x, w_up, w_down], upstream)
    want, want_grads = grads_of(lambda a, b, c: plain_mlp(a, b, c, slope), [x, w_up, w_down], upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11)


def test_fused_mlp_passes_gradcheck():
    x, w_up, w_down = leaves((3, 4), (6, 4), (4, 6), seed=2)
    assert torch.autograd.gradcheck(lambda a, b, c: fused_mlp(a, b, c, 0.5), (x, w_up, w_down))


def test_fused_mlp_backward_epilogue_reference_is_the_activation_derivative():
    # down_grad_act's torch formula (what the Triton epilogue computes) against autograd of act.
    g = torch.Generator().manual_seed(3)
    u = torch.randn(5, 6, generator=g, dtype=F64, requires_grad=True)
    grad_y, w_down = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(4, 6, generator=g, dtype=F64)
    grad_u, h = fused_mlp_module.down_grad_act(grad_y, w_down, u.detach(), 0.5, use_triton=False)
    act = F.leaky_relu(u, 0.5).square()
    act.backward(grad_y @ w_down)
    torch.testing.assert_close(grad_u, u.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, act.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------ fused loss
@pytest.mark.parametrize("cap", [30.0, 1.5, 0.0])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_fused_loss_forward_and_backward_match_float64_reference(cap, chunk_rows):
    x, weight = leaves((3, 5, 8), (11, 8), seed=4, scale=2.0)  # logits of order 10: the cap matters
    targets = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(5))
    upstream = torch.rand(3, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    got, got_grads = grads_of(lambda a, b: softcap_token_nll(a, b, targets, cap, chunk_rows), [x, weight], upstream)
    want, want_grads = grads_of(lambda a, b: plain_softcap_nll(a, b, targets, cap), [x, weight], upstream)
    assert got.dtype == F64 and got.shape == targets.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_fused_loss_passes_gradcheck():
    x, weight = leaves((5, 4), (7, 4), seed=7)
    targets = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda a, b: softcap_token_nll(a, b, targets, 2.0, 2), (x, weight))


def test_fused_loss_row_references_are_each_others_derivative():
    # The two row formulas the Triton kernel implements: backward = d(forward)/d(logits).
    g = torch.Generator().manual_seed(8)
    logits = (10 * torch.randn(6, 9, generator=g, dtype=F64)).requires_grad_()
    targets = torch.randint(0, 9, (6,), generator=g)
    upstream = torch.rand(6, generator=g, dtype=F64)
    nll, lse = rows_forward_reference(logits, targets, 5.0)
    (nll * upstream).sum().backward()
    got = rows_backward_reference(logits.detach(), targets, lse.detach(), upstream, 5.0)
    torch.testing.assert_close(got, logits.grad, rtol=0, atol=1e-13)


def test_fused_loss_keeps_fp32_for_bf16_inputs():
    x = torch.randn(4, 8).bfloat16()
    nll = softcap_token_nll(x, torch.randn(5, 8).bfloat16(), torch.tensor([0, 1, 2, 4]), 30.0)
    assert nll.dtype == torch.float32


@pytest.mark.slow  # > 1 s: kept out of the fast lane
def test_fused_ops_compile_in_one_graph():
    """fullgraph=True: dynamo traces both custom ops (fake shapes + autograd) without a break."""
    x, w_up, w_down, weight = leaves((2, 3, 8), (12, 8), (8, 12), (11, 8), seed=9)
    targets = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(10))

    def step(a, b, c, d):
        return softcap_token_nll(a + fused_mlp(a, b, c, 0.5), d, targets, 30.0, 4).mean()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    _, got = grads_of(compiled, [x, w_up, w_down, weight], torch.ones((), dtype=F64))
    _, want = grads_of(step, [x, w_up, w_down, weight], torch.ones((), dtype=F64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ dispatch in the model
def _loss_and_grads(model, ids):
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_off_is_todays_path_exactly(monkeypatch):
    """Both params off: neither fused op is reached (so the CPU default is bit-identical)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("fused op called with the param off")
    # The model binds the fused ops when built, from their modules (imported only when a param is on).
    monkeypatch.setattr("pgolf.model.fused_mlp.fused_mlp", forbidden)
    monkeypatch.setattr("pgolf.model.fused_loss.softcap_token_nll", forbidden)
    cfg = tiny_model_config()
    assert not cfg.fused_mlp and not cfg.fused_loss
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    loss, _ = _loss_and_grads(model, ids)
    assert torch.isfinite(loss)
    model.eval()
    assert model.token_nll(ids[:, :-1], ids[:, 1:]).shape == (2, 16)


@pytest.mark.parametrize("dtype,atol", [(F64, 1e-11), (torch.float32, 2e-5)])
def test_fused_model_matches_the_plain_model(dtype, atol):
    """Same weights, params on vs off: same loss, per-token NLL and gradients (fp64: rounding only)."""
    cfg = tiny_model_config()
    torch.manual_seed(0)
    plain = GPT(cfg).to(dtype)
    with torch.no_grad():  # the zero-initialised down/output matrices would hide MLP errors
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = GPT(cfg.replace(fused_mlp=True, fused_loss=True)).to(dtype)
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(plain, ids), _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=atol, msg=name)
    torch.testing.assert_close(fused.token_nll(ids[:, :-1], ids[:, 1:]), plain.token_nll(ids[:, :-1], ids[:, 1:]),
                               rtol=0, atol=atol)


def test_a_hook_on_the_mlp_matmuls_keeps_the_plain_path(monkeypatch):
    """GPTQ's Hessian collection hooks blocks.i.mlp.fc / .proj: it must still see their inputs."""
    cfg = tiny_model_config(fused_mlp=True)
    calls = []
    monkeypatch.setattr("pgolf.model.fused_mlp.fused_mlp", lambda *a: calls.append(1) or fused_mlp(*a))
    model = GPT(cfg)
    seen = []
    model.blocks[0].mlp.proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 9)))
    assert seen == [(1, 9, cfg.mlp_hidden)]
    assert len(calls) == cfg.num_layers - 1  # the other blocks fuse


def test_checkpoints_without_the_keys_load_with_them_off():
    cfg = tiny_model_config()
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("fused_mlp", "fused_loss")}
    rebuilt = type(cfg).from_dict(old)
    assert rebuilt == cfg and not rebuilt.fused_mlp and not rebuilt.fused_loss


# ------------------------------------------------------------------ Triton on CUDA (bf16)
@pytest.mark.gpu
def test_triton_fused_mlp_on_cuda_matches_float64_reference():
    """bf16 inputs at a record-like shape; tolerance: bf16 outputs (8 mantissa bits) of K=512 sums."""
    torch.manual_seed(0)
    x = torch.randn(4096, 512, device="cuda") * 0.5
    w_up, w_down = torch.randn(1536, 512, device="cuda") / 512 ** 0.5, torch.randn(512, 1536, device="cuda") / 40
    upstream = torch.randn(4096, 512, device="cuda")
    got, got_grads = grads_of(lambda a, b, c: fused_mlp(a, b, c, 0.5),
                              [t.bfloat16().requires_grad_() for t in (x, w_up, w_down)], upstream.bfloat16())
    want, want_grads = grads_of(lambda a, b, c: plain_mlp(a, b, c, 0.5),
                                [t.bfloat16().double().requires_grad_() for t in (x, w_up, w_down)],
                                upstream.bfloat16().double())
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=5e-2 * w.abs().max().item())


@pytest.mark.gpu
def test_triton_fused_loss_on_cuda_matches_float64_reference():
    """bf16 hidden states and weights (the record's vocabulary 1024 and soft-cap 30); the logits are
    rounded to bf16 before the fp32 soft-cap in both paths, so loss within 2e-2, grads 2 % of max."""
    torch.manual_seed(0)
    x, weight = torch.randn(3000, 512, device="cuda"), torch.randn(1024, 512, device="cuda") * 0.2
    targets = torch.randint(0, 1024, (3000,), device="cuda")
    upstream = torch.rand(3000, device="cuda")
    got, got_grads = grads_of(lambda a, b: softcap_token_nll(a, b, targets, 30.0, 1024),
                              [t.bfloat16().requires_grad_() for t in (x, weight)], upstream)
    want, want_grads = grads_of(lambda a, b: plain_softcap_nll(a, b, targets, 30.0),
                                [t.bfloat16().double().requires_grad_() for t in (x, weight)], upstream.double())
    assert fused_loss.triton_support.available(x)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-2 * w.abs().max().item())


@pytest.mark.gpu
def test_compiled_fused_model_step_matches_the_plain_compiled_step():
    """The CPU default model on the GPU, torch.compile(fullgraph) + bf16 autocast, params on vs off, both
    measured against an fp32 eager reference of the same weights: loss within 1e-2 nats of each other, and
    each gradient's error (L2 norm of the difference to the reference) at most twice the plain path's
    plus 2e-2 of the reference's norm (about five bf16 units of rounding). An elementwise bf16-vs-bf16
    comparison is not a fair bar: a per-head gain's gradient (``attn.q_gain``) is a sum of many
    cancelling terms, so rounding at other points than inductor's kernels moves it by more than any fixed
    relative tolerance, on either path; a gradient that nearly cancels to zero (``value_embed.scale``:
    norm 3.9e-7, fused error 5.0e-9 = 1.3 %, plain 1.1e-9, on the H200) needs the relative floor."""
    from pgolf.precision import maybe_compile, training_compile_options
    cfg = tiny_model_config()
    ids = torch.randint(0, cfg.vocab_size, (4, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(fused: bool, compiled: bool, bf16: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(cfg.replace(fused_mlp=fused, fused_loss=fused)).cuda()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        step = maybe_compile(model, compiled, training_compile_options(False))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = step(ids[:, :-1], ids[:, 1:])
        loss.backward()
        return loss.detach().float(), {n: p.grad.detach().double() for n, p in model.named_parameters()}

    loss_ref, grads_ref = run(fused=False, compiled=False, bf16=False)
    loss_plain, grads_plain = run(fused=False, compiled=True, bf16=True)
    loss_fused, grads_fused = run(fused=True, compiled=True, bf16=True)
    torch.testing.assert_close(loss_fused, loss_plain, rtol=0, atol=1e-2)
    torch.testing.assert_close(loss_plain, loss_ref, rtol=0, atol=1e-2)
    for name, ref in grads_ref.items():
        err_plain = (grads_plain[name] - ref).norm().item()
        err_fused = (grads_fused[name] - ref).norm().item()
        assert err_fused <= 2 * err_plain + 2e-2 * ref.norm().item(), (name, err_fused, err_plain, ref.norm().item())
