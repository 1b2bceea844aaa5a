"""bench/loss_curves.py reads train.log files into (tokens, loss) and refuses other files."""
from __future__ import annotations

import pytest

from bench.loss_curves import main, read_curve

LOG = """train: 1,000 parameters, world 1, grad accum 2, 4,096 tokens/step, device cpu, compile False
compile warm-up: 0 steps
step 1/30 loss 6.9000 lr_scale 1.000 grad_norm 0.4 tok/s 5,574 train_time 0.7s swa 0
step 10/30 loss 5.5000 lr_scale 1.000 grad_norm 0.6 tok/s 11,712 train_time 3.5s swa 0
final weights: live
"""


def test_reads_tokens_seen_and_loss(tmp_path):
    (tmp_path / "train.log").write_text(LOG)
    assert read_curve(tmp_path / "train.log") == ([4096, 40960], [6.9, 5.5])
    main(["a=" + str(tmp_path / "train.log"), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_a_train_log_is_one_clear_error(tmp_path):
    (tmp_path / "x.log").write_text("hello\n")
    with pytest.raises(SystemExit, match="x.log: no 'tokens/step' header"):
        read_curve(tmp_path / "x.log")
    with pytest.raises(SystemExit, match="expected LABEL=path"):
        main([str(tmp_path / "x.log"), "--out", str(tmp_path / "c.png")])
