"""The plain paths that stand in for lazily imported modules when their feature is off (so the bundle leaves
those modules out) behave exactly like the full ones with the feature off; the driver never resumes."""
from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import torch

from pgolf.config import from_params
from pgolf.eval.frozen_blocks import FrozenBlocks
from pgolf.eval.ttt import AllTrainable
from pgolf.train.config import TrainConfig
from pgolf.train.context import TrainContext
from pgolf.train.loop import FixedContext
from tests.helpers import tiny_train_params
from tests.helpers.models import tiny_model

REPO = Path(__file__).resolve().parents[2]


class RecordingLoader:
    def __init__(self):
        self.calls: list[int] = []

    def set_seq_len(self, n: int) -> None:
        self.calls.append(n)


def drive(context, cfg: TrainConfig, steps: int) -> tuple:
    """Everything the training loop asks a context, in the loop's order (warm-up, reset, steps)."""
    loader, model = RecordingLoader(), SimpleNamespace(cfg=SimpleNamespace(doc_attention=False))
    seen = [context.row_tokens(cfg.seq_len), context.warmup_lengths()]
    for length in context.warmup_lengths():
        context.apply(length, model, loader)
    context.length = None
    for step in range(steps):
        seen.append((context.step(step, step * 0.1, model, loader), context.lr_factor(step)))
    return seen, loader.calls, context.switches, context.length


def test_fixed_context_is_train_context_without_schedule_or_packed_rows():
    cfg = from_params(TrainConfig, tiny_train_params(), "train")
    assert not cfg.seq_len_schedule and not cfg.packed_rows
    model = SimpleNamespace(cfg=SimpleNamespace(doc_attention=False))
    full = drive(TrainContext(cfg, model), cfg, 12)
    assert drive(FixedContext(cfg.seq_len), cfg, 12) == full
    assert all(factor == 1.0 and type(factor) is float for _, factor in full[0][2:])


def test_all_trainable_is_frozen_blocks_with_none_frozen():
    model = tiny_model()
    frozen = FrozenBlocks(model, 0)
    plain = AllTrainable(model)
    assert [id(p) for p in plain.trainable] == [id(p) for p in frozen.trainable]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain.restore_()
    plain.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in plain.trainable)


def test_the_driver_trains_without_a_resume_file():
    """pgolf/submission/optional.py never packs pgolf.train.resume: the driver must not pass RunFiles.resume."""
    tree = ast.parse((REPO / "pgolf/submission/driver.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "RunFiles"]
    assert calls and all(not n.args[2:] and all(k.arg != "resume" for k in n.keywords) for n in calls)
