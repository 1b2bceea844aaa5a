"""Hessian collection on a tiny real GPT (VRL, value embeddings, XSA all on) and its data sources."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.model.checkpoint import build_model, Checkpoint
from pgolf.errors import DataError
from pgolf.quant.hessian_file import (HessianSet, hessian_key_for_module, hessian_key_for_weight,
                                     load_hessians, save_hessians)
from pgolf.model.sampling import autoregressive_batches
from pgolf.quant.hessians import (HessianCollector, HessiansConfig, check_train_shards, collect_hessians,
                                  train_calibration_batches)
from tests.helpers.models import hessian_config, tiny_model
from pgolf.data.shards import write_shard

F64 = torch.float64
def no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_hook_hessians_equal_float64_sums_of_the_captured_inputs():
    model = tiny_model()
    ids = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(0))
    captured: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(
        lambda _m, args, name=name: captured.setdefault(name, []).append(args[0].detach().clone()))
        for name, module in model.named_modules() if hessian_key_for_module(name)]
    with torch.no_grad():
        model.forward_logits(ids)
    for h in handles:
        h.remove()
    hs = collect_hessians(model, [ids[:2], ids[2:]], torch.device("cpu"), no_autocast)
    # Q, K and V of each layer read one tensor: that is what makes one qkv Hessian right.
    for i in range(3):
        for other in ("c_k", "c_v"):
            assert torch.equal(captured[f"blocks.{i}.attn.c_q"][0], captured[f"blocks.{i}.attn.{other}"][0])
    expected_keys = {f"blocks.{i}.{k}" for i in range(3) for k in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert set(hs.hessians) == expected_keys
    for name, inputs in captured.items():
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(F64)
        ref = (x.T @ x).float()
        torch.testing.assert_close(hs.hessians[hessian_key_for_module(name)], ref, rtol=1e-6, atol=1e-6)
    assert hs.hessians["blocks.0.mlp.proj"].shape == (64, 64)
    assert (hs.num_tokens, hs.num_sequences) == (48, 3)


def test_collector_rejects_a_model_that_feeds_k_a_different_input():
    model = tiny_model()
    # A pre-hook registered first replaces K's input for the hooks after it.
    model.blocks[0].attn.c_k.register_forward_pre_hook(lambda m, args: (args[0] + 1.0, args[1]))
    with pytest.raises(RuntimeError, match="different input"):
        collect_hessians(model, [torch.zeros(1, 4, dtype=torch.long)], torch.device("cpu"), no_autocast)


def test_hooks_are_removed_afterwards():
    model = tiny_model()
    with HessianCollector(model) as collector:
        pass
    with torch.no_grad():
        model.forward_logits(torch.zeros(1, 4, dtype=torch.long))
    assert collector.sums == {}


def test_weight_names_map_to_hessian_keys():
    assert hessian_key_for_weight("blocks.3.attn.c_k.weight") == "blocks.3.attn.qkv"
    assert hessian_key_for_weight("blocks.3.attn.proj.weight") == "blocks.3.attn.proj"
    assert hessian_key_for_weight("blocks.0.mlp.proj.weight") == "blocks.0.mlp.proj"
    assert hessian_key_for_weight("tok_emb.weight") is None
    assert hessian_key_for_module("blocks.1.attn") is None


# ------------------------------------------------------------ data sources
def write_shards(directory, split, arrays):
    paths = []
    for i, arr in enumerate(arrays):
        path = directory / f"{split}_{i:06d}.bin"
        write_shard(path, np.asarray(arr, dtype=np.uint16))
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", ["val_000000.bin", "fineweb_val_000000.bin", "train_000000.txt",
                                  "notes.bin"])
def test_non_train_files_are_refused(tmp_path, name):
    with pytest.raises(DataError, match="not a train shard"):
        check_train_shards([tmp_path / "train_000000.bin", tmp_path / name])


def test_validation_shards_are_refused_before_reading(tmp_path):
    val = write_shards(tmp_path, "val", [np.arange(500) % 64])
    with pytest.raises(DataError, match="val_000000.bin: not a train shard"):
        list(train_calibration_batches(val, 64, hessian_config(), 0, 1))


def test_train_batches_are_consecutive_sequences_split_across_ranks(tmp_path):
    stream = (np.arange(200) * 7) % 64
    paths = write_shards(tmp_path, "train", [stream[:90], stream[90:]])
    cfg = hessian_config(seq_len=10, train_batches=3, train_batch_seqs=5)
    single = list(train_calibration_batches(paths, 64, cfg, 0, 1))
    assert [b.shape for b in single] == [(5, 10)] * 3
    assert torch.equal(torch.cat(single).reshape(-1), torch.from_numpy(stream[:150]).long())
    shares = [list(train_calibration_batches(paths, 64, cfg, r, 2)) for r in range(2)]
    for b in range(3):
        assert torch.equal(torch.cat([shares[0][b], shares[1][b]]), single[b])


def test_too_few_train_tokens_is_a_clear_error(tmp_path):
    paths = write_shards(tmp_path, "train", [np.arange(50) % 64])
    with pytest.raises(DataError, match="calibration needs 96 train tokens"):
        list(train_calibration_batches(paths, 64, hessian_config(), 0, 1))


def test_autoregressive_samples_are_seeded_and_rank_invariant():
    model = tiny_model()
    cpu = torch.device("cpu")
    cfg = hessian_config(source="autoregressive")
    first = torch.cat(list(autoregressive_batches(model, cfg, 0, 1, cpu)))
    again = torch.cat(list(autoregressive_batches(model, cfg, 0, 1, cpu)))
    assert first.shape == (5, 16) and torch.equal(first, again)
    two_ranks = torch.cat([b for r in range(2) for b in autoregressive_batches(model, cfg, r, 2, cpu)])
    assert torch.equal(two_ranks, first)


@pytest.mark.parametrize("change", [dict(seed=2), dict(ar_temperature=1.5), dict(ar_num_seqs=6),
                                    dict(seq_len=12), dict(ar_batch_seqs=3)])
def test_every_autoregressive_param_changes_the_hessians(change):
    model = tiny_model()
    cpu = torch.device("cpu")

    def hessians(cfg):
        return collect_hessians(model, autoregressive_batches(model, cfg, 0, 1, cpu), cpu, no_autocast)

    base = hessians(hessian_config(source="autoregressive"))
    other = hessians(hessian_config(source="autoregressive", **change))
    assert not torch.equal(base.hessians["blocks.0.attn.qkv"], other.hessians["blocks.0.attn.qkv"])


@pytest.mark.parametrize("change", [dict(train_batches=3), dict(train_batch_seqs=2), dict(seq_len=8)])
def test_every_train_param_changes_the_hessians(tmp_path, change):
    model = tiny_model()
    paths = write_shards(tmp_path, "train", [(np.arange(400) * 5) % 64])
    cpu = torch.device("cpu")

    def hessians(cfg):
        return collect_hessians(model, train_calibration_batches(paths, 64, cfg, 0, 1), cpu, no_autocast)

    base, other = hessians(hessian_config()), hessians(hessian_config(**change))
    assert not torch.equal(base.hessians["blocks.1.mlp.fc"], other.hessians["blocks.1.mlp.fc"])


# ----------------------------------------------------------------- file
def test_save_load_round_trip_keeps_raw_sums(tmp_path):
    hs = HessianSet(hessians={"blocks.0.attn.qkv": torch.randn(4, 4)}, num_tokens=12, num_sequences=3)
    save_hessians(tmp_path / "h.pt", hs)
    back = load_hessians(tmp_path / "h.pt")
    assert torch.equal(back.hessians["blocks.0.attn.qkv"], hs.hessians["blocks.0.attn.qkv"])
    assert (back.num_tokens, back.num_sequences) == (12, 3)


class _NotATensor:
    pass


def test_load_refuses_files_that_are_not_tensors_only(tmp_path):
    torch.save({"hessians": {"x": _NotATensor()}, "num_tokens": torch.tensor(1)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="bad.pt: not a readable Hessian file"):
        load_hessians(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pt"):
        load_hessians(tmp_path / "junk.pt")
    with pytest.raises(DataError, match="not found"):
        load_hessians(tmp_path / "missing.pt")


def test_build_model_path_gives_the_same_hessians():
    # The stage rebuilds the model from a checkpoint; hooks must see the same thing.
    model = tiny_model()
    rebuilt = build_model(Checkpoint(model.cfg, model.state_dict(), {}), "cpu").eval()
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(3))
    a = collect_hessians(model, [ids], torch.device("cpu"), no_autocast)
    b = collect_hessians(rebuilt, [ids], torch.device("cpu"), no_autocast)
    for key in a.hessians:
        assert torch.equal(a.hessians[key], b.hessians[key])


@pytest.mark.gpu
def test_cuda_collection_matches_cpu():
    model = tiny_model()
    ids = torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(5))
    cpu = collect_hessians(model, [ids], torch.device("cpu"), no_autocast)
    cuda = collect_hessians(tiny_model().cuda(), [ids], torch.device("cuda"),
                            lambda: torch.autocast("cuda", enabled=False))
    for key, h in cpu.hessians.items():
        torch.testing.assert_close(cuda.hessians[key], h, rtol=1e-4, atol=1e-4)
    # bf16 autocast: the fast fp32-output GEMM path against float64 sums of the captured inputs.
    model = tiny_model().cuda()
    captured = {}

    def capture(name):
        def hook(_module, args):
            captured[name] = args[0].detach().clone()
        return hook

    for name, module in model.named_modules():
        if hessian_key_for_module(name) and not name.endswith((".c_k", ".c_v")):
            module.register_forward_pre_hook(capture(name))
    bf16 = collect_hessians(model, [ids], torch.device("cuda"),
                            lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    assert bf16.num_tokens == cpu.num_tokens == 64
    # Under autocast some inputs reach the hooks in fp32 (norm outputs, the squared
    # MLP hidden state) and F.linear casts them to bf16: H is of what it multiplies.
    assert {x.dtype for x in captured.values()} == {torch.float32, torch.bfloat16}
    for name, x in captured.items():
        flat = x.reshape(-1, x.shape[-1]).bfloat16().double()
        torch.testing.assert_close(bf16.hessians[hessian_key_for_module(name)].cuda(),
                                   (flat.T @ flat).float(), rtol=1e-5, atol=1e-5)


def test_forwards_of_a_few_sequences_give_the_whole_batch_sums():
    """hessians.forward_seqs only bounds memory: splitting a batch into forwards of 2 sequences gives the
    same Hessians, head Hessian and activation RMS (float64 sums; float32 stored) and the same counts."""
    model = tiny_model()
    ids = torch.randint(64, (5, 16), generator=torch.Generator().manual_seed(3))
    whole = collect_hessians(model, [ids], torch.device("cpu"), no_autocast, head=True, activation_rms=True)
    seen: list[int] = []
    hook = model.blocks[0].attn.c_q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    split = collect_hessians(model, [ids], torch.device("cpu"), no_autocast, head=True, activation_rms=True,
                             forward_seqs=2)
    hook.remove()
    assert seen == [2, 2, 1]  # the forwards really were of at most 2 sequences
    assert set(split.hessians) == set(whole.hessians) and (split.num_tokens, split.num_sequences) == (80, 5)
    for key, h in whole.hessians.items():
        torch.testing.assert_close(split.hessians[key], h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(split.act_rms[key], whole.act_rms[key], rtol=1e-6, atol=1e-7)
    with pytest.raises(Exception, match="forward_seqs"):
        HessiansConfig(source="train", seq_len=4, train_batches=1, train_batch_seqs=1, ar_num_seqs=1,
                       ar_batch_seqs=1, ar_temperature=1.0, seed=0, forward_seqs=-1)
