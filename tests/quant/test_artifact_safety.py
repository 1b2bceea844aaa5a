"""Files the pipeline writes and reads back, under hostile or repeated use (issue 18).

* Same inputs, same bytes: checkpoints, weight averages and Hessians
  (``torch.save`` used to record its random temporary file name in the zip).
* Non-finite weights are refused when quantising and when reading an artifact;
  metrics JSON never holds NaN/Inf; ``pgolf inspect`` flags them.
* A crafted ``.ptz`` (decompression bomb) is refused within a small memory ceiling.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pgolf.model.checkpoint import save_checkpoint
from pgolf.model.gpt import GPT, ModelConfig
from pgolf.quant.hessian_file import HessianSet, save_hessians
from tests.helpers import link_data, tiny_model_config, tiny_train_params

CFG = tiny_model_config(vocab_size=64, num_heads=4, num_kv_heads=2, rope_dims=4, bigram_buckets=16, bigram_dim=8)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- item 10: deterministic tensor files -----------------------------------------------

def test_same_tensors_saved_to_different_paths_have_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    a, b = tmp_path / "a" / "model.pt", tmp_path / "bb" / "other_name.pt"
    save_checkpoint(a, CFG, state, {"step": 3})
    save_checkpoint(b, CFG, state, {"step": 3})
    assert sha256(a) == sha256(b)
    hs = HessianSet(hessians={"blocks.0.attn.qkv": torch.eye(4)}, num_tokens=10, num_sequences=2)
    save_hessians(tmp_path / "h1.pt", hs)
    save_hessians(tmp_path / "dir" / "hessians.pt", hs)
    assert sha256(tmp_path / "h1.pt") == sha256(tmp_path / "dir" / "hessians.pt")
    from pgolf.io import save_tensor_file
    payload = {"weights": {"live": {"w": torch.ones(3)}}, "chosen": "live"}
    save_tensor_file(tmp_path / "x.pt", payload)
    save_tensor_file(tmp_path / "y.pt", payload)
    assert sha256(tmp_path / "x.pt") == sha256(tmp_path / "y.pt")
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_two_tiny_training_runs_write_byte_identical_checkpoints(tmp_path, tiny_data):
    import stages.train
    params = tiny_train_params(train={"max_steps": 6, "warmdown_steps": 3, "log_every": 3})
    hashes = []
    for run in ("run1", "run2"):
        root = link_data(tmp_path / run, tiny_data)
        stages.train.run(params, root)
        hashes.append({name: sha256(root / "artifacts/train" / name) for name in ("model.pt", "averages.pt")})
    assert hashes[0] == hashes[1]


# --- item 6: non-finite weights -----------------------------------------------------

def _stored(scale_value: float = 0.01, raw_value: float = 1.0) -> list:
    from pgolf.quant.artifact import StoredTensor
    return [StoredTensor("blocks.0.attn.c_q.weight", (2, 3), "float32", "gptq", bits=6,
                         q=torch.tensor([[1, -2, 3], [0, 4, -5]], dtype=torch.int8),
                         scale=torch.tensor([0.01, scale_value], dtype=torch.float16)),
            StoredTensor("gain", (3,), "float32", "passthrough",
                         raw=torch.tensor([1.0, raw_value, 2.0], dtype=torch.float16))]


@pytest.mark.parametrize("what,kwargs,message", [
    ("nan_scale", {"scale_value": float("nan")}, "tensor blocks.0.attn.c_q.weight: 1 of 2 scale values are not finite"),
    ("inf_passthrough", {"raw_value": float("inf")}, "tensor gain: 1 of 3 passthrough values are not finite"),
])
def test_the_reader_refuses_a_checksum_valid_artifact_with_non_finite_values(tmp_path, what, kwargs, message):
    from pgolf.errors import DataError
    from pgolf.quant.artifact import encode, read_artifact
    path = tmp_path / f"{what}.ptz"
    path.write_bytes(encode(_stored(**kwargs), {"vocab_size": 64}, {}, "zstd", 3))  # a valid sha256
    with pytest.raises(DataError) as info:
        read_artifact(path)
    assert str(info.value) == f"{path}: {message} (NaN/Inf)"
    read_artifact_ok = tmp_path / "ok.ptz"
    read_artifact_ok.write_bytes(encode(_stored(), {"vocab_size": 64}, {}, "zstd", 3))
    assert len(read_artifact(read_artifact_ok).tensors) == 2


def test_quantize_refuses_a_checkpoint_with_nan_weights_naming_the_tensor(tmp_path):
    import stages.quantize
    from pgolf.errors import DataError
    from pgolf.tools.profiles import compose
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    name = next(k for k in sorted(state) if state[k].dim() >= 2)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / stages.quantize.CHECKPOINT, CFG, state, {})
    save_hessians(tmp_path / stages.quantize.HESSIANS, HessianSet(hessians={}, num_tokens=1, num_sequences=1))
    params = compose("cpu")
    params["launch"]["device"] = "cpu"
    with pytest.raises(DataError) as info:
        stages.quantize.run(params, tmp_path)
    assert str(info.value) == (f"{tmp_path / stages.quantize.CHECKPOINT}: tensor {name}: 1 of {state[name].numel()} "
                               "weight values are not finite (NaN/Inf)")
    assert not (tmp_path / stages.quantize.OUT_DIR / "model.ptz").exists()


def test_metrics_json_never_holds_nan_or_inf(tmp_path):
    import json

    from pgolf.errors import DataError
    from pgolf.io import write_json_atomic
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"val_bpb": 1.5})
    for bad, key in (({"val_bpb": float("nan")}, "val_bpb is nan"),
                     ({"rows": [{"x": 1.0}, {"x": float("-inf")}]}, "rows[1].x is -inf")):
        with pytest.raises(DataError, match=rf"metrics.json: {key.replace('[', '.').replace(']', '.')}, not a finite"):
            write_json_atomic(path, bad)
    assert json.loads(path.read_text()) == {"val_bpb": 1.5}  # the last good file is untouched
    assert not list(tmp_path.glob(".*.tmp"))


def test_inspect_flags_non_finite_checkpoints_and_metrics(tmp_path):
    from pgolf.tools.inspect import InspectOptions, summarise_file
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("inf"))
    save_checkpoint(tmp_path / "model.pt", CFG, state, {})
    summary = summarise_file(tmp_path / "model.pt", InspectOptions())
    assert summary.facts["non_finite"] == {name: state[name].numel()}
    assert any(line.startswith(f"WARNING: NaN/Inf values in 1 tensor(s): {name}") for line in summary.lines)
    metrics = tmp_path / "eval.json"  # what the old eval stage wrote
    metrics.write_text('{"val_bpb": NaN, "val_loss": 2.0, "nonoverlap_val_bpb": 1.0}')
    summary = summarise_file(metrics, InspectOptions())
    assert summary.lines[0].startswith("WARNING: val_bpb is nan (NaN/Inf is not valid JSON")
    assert summary.facts["non_finite_key"] == "val_bpb"


# --- item 7: decompression bomb -----------------------------------------------------

BOMB_READER = r"""
import resource, sys
from pgolf.errors import DataError
from pgolf.quant.artifact import read_artifact
# Address space now + 300 MB: the crafted file declares 1 GiB.
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), resource.RLIM_INFINITY))
try:
    read_artifact(sys.argv[1])
except DataError as exc:
    print(f"error: {exc}")
    sys.exit(1)
print("read")
"""


def _bomb(raw_len: int, frame_len: int) -> bytes:
    """A checksum-valid ``.ptz`` whose one zstd frame of zeros declares ``frame_len`` bytes."""
    import struct

    import zstandard

    from pgolf.quant import artifact
    obj = zstandard.ZstdCompressor(level=1).compressobj(size=frame_len)
    chunk = bytes(4 << 20)
    packed = b"".join(obj.compress(chunk) for _ in range(frame_len // len(chunk))) + obj.flush()
    return struct.pack("<8sHBBQQ32s", artifact.MAGIC, artifact.FORMAT_VERSION, 1, 0, len(packed), raw_len,
                       hashlib.sha256(packed).digest()) + packed


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_under_a_memory_ceiling(tmp_path):
    """Old reader: the header's 1 GiB passed (cap 4 GiB), the frame was decompressed, MemoryError."""
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[2]
    path = tmp_path / "bomb.ptz"
    path.write_bytes(_bomb(1 << 30, 1 << 30))
    assert path.stat().st_size < 100_000
    proc = subprocess.run([sys.executable, "-c", BOMB_READER, str(path)], capture_output=True, text=True,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.strip() == (f"error: {path}: header claims an implausible 1,073,741,824-byte payload from "
                                   f"{path.stat().st_size - 60:,} compressed bytes (at most 67,108,864); "
                                   "refused before decompressing")


def test_payload_limit_bounds_every_declared_size():
    from pgolf.quant.artifact import MAX_PAYLOAD_BYTES, MIN_PAYLOAD_LIMIT, payload_limit
    assert payload_limit(131_000) == MIN_PAYLOAD_LIMIT
    assert payload_limit(16_000_000) == 32 * 16_000_000
    assert payload_limit(1 << 40) == MAX_PAYLOAD_BYTES


def test_a_frame_declaring_more_than_the_header_is_refused_without_inflating_it(tmp_path):
    """A small header (passes the limit) with a 512 MiB frame: refused from the frame's declared size."""
    import tracemalloc

    from pgolf.errors import DataError
    from pgolf.quant.artifact import read_artifact
    path = tmp_path / "bomb.ptz"
    path.write_bytes(_bomb(1 << 20, 512 << 20))
    tracemalloc.start()
    with pytest.raises(DataError, match="payload decompresses to more than the header's 1048576 bytes"):
        read_artifact(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
