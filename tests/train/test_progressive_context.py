"""Progressive context (docs/FRONTIER.md §3.3): switch points, validation, loader shapes, a run that crosses both."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import link_data, tiny_model_config, tiny_train_params

import stages.train
from pgolf.config import from_params
from pgolf.data.loader import TrainLoader, open_train_stream
from pgolf.data.shards import write_shard
from pgolf.errors import ParamError
from pgolf.model.gpt import GPT
from pgolf.train.config import TrainConfig
from pgolf.train.context import TrainContext
from pgolf.train.schedule import parse_seq_len_schedule, run_progress, scheduled_seq_len, seq_change_ramp

pytestmark = pytest.mark.usefixtures("one_thread")

P2014 = parse_seq_len_schedule(["1024@0.100", "2048@0.700", "3072@1.000"])


def test_p2014_lengths_by_clock_fraction():
    cap = 596.0  # P2014's 600 s minus its 4 s reserve
    at = [scheduled_seq_len(P2014, run_progress(0, 20000, s, cap)) for s in (0.0, 59.6, 59.61, 417.2, 417.3, 596.0)]
    assert at == [1024, 1024, 2048, 2048, 3072, 3072]
    assert scheduled_seq_len(P2014, 1.3) == 3072  # past the end (the last step may overrun the cap)


def test_switch_points_by_steps_without_a_clock():
    schedule = parse_seq_len_schedule(["16@0.25", "32@0.5", "64@1"])
    lengths = [scheduled_seq_len(schedule, run_progress(s, 12, 0.0, 0.0)) for s in range(12)]
    assert lengths == [16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64]


def test_lr_ramp_after_a_change():
    assert [seq_change_ramp(s, 5, 4) for s in range(3, 11)] == [1, 1, 0.25, 0.5, 0.75, 1.0, 1, 1]
    assert seq_change_ramp(7, None, 32) == 1.0 and seq_change_ramp(5, 5, 0) == 1.0


def train_config(**changes) -> TrainConfig:
    return from_params(TrainConfig, {"train": tiny_train_params(train=changes)["train"]}, "train")


@pytest.mark.parametrize("changes, message", [
    ({"seq_len_schedule": ["16@0.5", "32@0.9"]}, "must end at fraction 1"),
    ({"seq_len_schedule": ["16"]}, "'16' is not LENGTH@FRACTION"),
    ({"seq_len_schedule": ["16@x", "32@1"]}, "'16@x' is not LENGTH@FRACTION"),
    ({"seq_len_schedule": ["0@0.5", "32@1"]}, "LENGTH >= 1"),
    ({"seq_len_schedule": ["16@0.5", "24@0.4", "32@1"]}, "fractions must rise strictly"),
    ({"seq_len_schedule": ["16@0.5", "64@1"]}, "the last length (64) must be seq_len (32)"),
    ({"seq_len_schedule": ["24@0.5", "32@1"]}, "length 24 must divide micro_batch_tokens (256)"),
    ({"seq_len_schedule": ["16@0.5", "32@1"], "packed_rows": True, "seq_len": 32,
      "micro_batch_tokens": 32, "tokens_per_step": 64, "holdout_tokens": 2049}, None),
    ({"seq_change_warmup_steps": -1}, "must be >= 0"),
])
def test_schedule_errors_are_one_param_error_line(changes, message):
    if message is None:
        assert train_config(**changes).context_schedule == ((16, 0.5), (32, 1.0))
        return
    with pytest.raises(ParamError) as err:
        train_config(**changes)
    text = str(err.value)
    assert "\n" not in text and message in text and "train.seq" in text


def test_packed_rows_need_document_attention():
    cfg = train_config(packed_rows=True)
    with pytest.raises(ParamError, match="train.packed_rows.*needs model.doc_attention"):
        TrainContext(cfg, GPT(tiny_model_config()))


def synthetic_loader(tmp_path, seq_len: int, local_tokens: int) -> TrainLoader:
    write_shard(tmp_path / "train_000000.bin", (np.arange(5000) % 1000).astype(np.uint16))
    return TrainLoader(open_train_stream(tmp_path, 1000), 100, seq_len, local_tokens, rank=0, world_size=1)


def test_loader_rows_follow_the_schedule_and_tokens_per_batch_stay(tmp_path):
    cfg = train_config(seq_len_schedule=["16@0.25", "32@1"], max_steps=8, warmdown_steps=4)
    model = GPT(tiny_model_config())
    context = TrainContext(cfg, model)
    loader = synthetic_loader(tmp_path, context.row_tokens(cfg.seq_len), cfg.micro_batch_tokens)
    shapes, changes = [], []
    for step in range(4):
        changes.append(context.step(step, 0.0, model, loader))
        x, y = loader.next_batch()
        shapes.append((tuple(x.shape), tuple(y.shape)))
        np.testing.assert_array_equal(x.reshape(-1)[1:].numpy(), y.reshape(-1)[:-1].numpy())  # one stream
    assert shapes == [((16, 16), (16, 16))] * 3 + [((8, 32), (8, 32))]  # progress 2/8 = 0.25 is still 16
    assert changes == [None, None, None, 32] and context.switches == [{"step": 3, "seq_len": 32}]
    assert model.doc_span is None  # rows: the row is the span, no cap
    with pytest.raises(ValueError, match="not a multiple"):
        loader.set_seq_len(24)


def test_packed_rows_keep_their_shape_and_move_the_cap(tmp_path):
    cfg = train_config(seq_len_schedule=["16@0.5", "32@1"], packed_rows=True, max_steps=4, warmdown_steps=2)
    model = GPT(tiny_model_config(doc_attention=True, doc_attention_impl="dense"))
    context = TrainContext(cfg, model)
    loader = synthetic_loader(tmp_path, context.row_tokens(cfg.seq_len), cfg.micro_batch_tokens)
    seen, caps = [], set()
    for step in range(4):
        context.step(step, 0.0, model, loader)
        caps.add(id(model.doc_span))
        x, _ = loader.next_batch()
        seen.append((tuple(x.shape), int(model.doc_span)))
    assert seen == [((1, 256), 16)] * 3 + [((1, 256), 32)]
    assert len(caps) == 1  # one tensor filled in place: a compiled graph reads the new cap, no recompile
    assert model.rope_cos.shape[0] >= 256


SCHEDULE_MODEL = {"doc_attention": True, "doc_attention_impl": "dense"}


@pytest.mark.slow  # two short training runs (~10 s on 2 cores)
@pytest.mark.parametrize("packed", [False, True])
def test_tiny_run_crosses_both_switches_with_finite_loss(tmp_path, tiny_data, packed):
    train = {"max_steps": 12, "warmdown_steps": 6, "seq_len_schedule": ["8@0.25", "16@0.5", "32@1.0"],
             "seq_change_warmup_steps": 2, "packed_rows": packed, "log_every": 1}
    p = tiny_train_params(model=SCHEDULE_MODEL, train=train)
    root = link_data(tmp_path, tiny_data)
    m = stages.train.run(p, root)
    assert m["context_switches"] == [{"step": 4, "seq_len": 16}, {"step": 7, "seq_len": 32}]
    assert m["steps"] == 12 and np.isfinite(m["final_train_loss"])
    log = (root / "artifacts/train/train.log").read_text()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if line.startswith("step ")]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert "context 16" in log and "from step 4" in log and "context 32" in log and "from step 7" in log
    assert torch.isfinite(torch.tensor(m["holdout_loss_live"]))


def test_the_warm_up_covers_every_row_shape_once():
    rows = TrainContext(train_config(seq_len_schedule=["8@0.25", "16@0.5", "32@1"]), GPT(tiny_model_config()))
    assert rows.warmup_lengths() == [8, 16, 32]
    packed_cfg = train_config(seq_len_schedule=["8@0.25", "32@1"], packed_rows=True)
    packed = TrainContext(packed_cfg, GPT(tiny_model_config(doc_attention=True)))
    assert packed.warmup_lengths() == [8]  # one graph: the cap is a tensor


@pytest.mark.slow  # two short training runs
def test_compile_warm_up_over_every_length_restores_the_starting_state_exactly(tmp_path, tiny_data):
    train = {"max_steps": 8, "warmdown_steps": 4, "seq_len_schedule": ["8@0.25", "16@0.5", "32@1.0"],
             "seq_change_warmup_steps": 2}
    runs = {}
    for name, warm in (("plain", 0), ("warmed", 2)):
        root = link_data(tmp_path / name, tiny_data)
        m = stages.train.run(tiny_train_params(model=SCHEDULE_MODEL, train={**train, "compile_warmup_steps": warm}),
                             root)
        assert m["context_switches"] == [{"step": 3, "seq_len": 16}, {"step": 5, "seq_len": 32}]
        runs[name] = torch.load(root / "artifacts/train/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(runs["plain"][k], runs["warmed"][k]) for k in runs["plain"])
