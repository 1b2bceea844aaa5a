"""StageLog (log file, tqdm on a terminal, plain lines otherwise) and the library loops' progress calls."""
from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from tests.helpers.eval_lm import TTT_SGD, WINDOWS, TinyBankLM, make_stream, make_tables

from pgolf.config import from_params  # noqa: E402
from pgolf.eval.sliding import score_nonoverlapping, score_sliding_windows  # noqa: E402
from pgolf.model.sampling import autoregressive_batches  # noqa: E402
from pgolf.quant.hessians import collect_hessians  # noqa: E402
from pgolf.model.gpt import unbank_state_dict  # noqa: E402
from pgolf.io import pending_path  # noqa: E402
from pgolf.progress import StageLog, format_seconds  # noqa: E402
from pgolf.quant.policy import QuantizeConfig, quantize_state_dict  # noqa: E402
from pgolf.eval.ttt import run_ttt  # noqa: E402

torch.set_num_threads(1)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Recorder:
    """A Progress that keeps every call."""

    def __init__(self):
        self.starts: list[tuple[str, int | None, str]] = []
        self.advances: list[tuple[int, int]] = []

    def start(self, task, total, unit):
        self.starts.append((task, total, unit))

    def advance(self, n=1, tokens=0):
        self.advances.append((n, tokens))

    def totals(self) -> tuple[int, int]:
        return sum(n for n, _ in self.advances), sum(t for _, t in self.advances)


def test_plain_lines_at_each_tenth_to_the_file_and_a_pipe(tmp_path):
    out = io.StringIO()
    with StageLog(tmp_path / "s.log", stream=out) as log:
        log.line("header")
        log.start("windows", 95, "windows")
        for _ in range(95):
            log.advance(1, tokens=64)
    lines = (tmp_path / "s.log").read_text().splitlines()
    assert out.getvalue().splitlines() == lines
    assert lines[:2] == ["header", "windows: 95 windows"]
    progress = lines[2:]
    done = [int(re.match(r"windows: (\d+)/95 windows \((\d+)%\)", ln).group(1)) for ln in progress]
    assert done == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]  # every ceil(95/10) items, then the end
    assert all(re.search(r", [\d,]+ tok/s, elapsed \d+s, ETA \d+s$", ln) for ln in progress[:-1])
    assert progress[-1].endswith("s") and "ETA" not in progress[-1]


def test_a_terminal_gets_a_bar_and_the_file_still_gets_the_lines(tmp_path):
    term = Terminal()
    with StageLog(tmp_path / "s.log", stream=term) as log:
        log.start("chunks", 4, "chunks")
        for _ in range(4):
            log.advance(1)
        log.line("done")
    lines = (tmp_path / "s.log").read_text().splitlines()
    assert lines[0] == "chunks: 4 chunks" and lines[-1] == "done"
    assert [ln.split(" (")[0] for ln in lines[1:-1]] == [f"chunks: {i}/4 chunks" for i in range(1, 5)]
    shown = term.getvalue()
    assert "4/4" in shown and "chunks/s" in shown and "done" in shown
    assert "4/4 chunks (100%)" not in shown  # no plain progress lines under the bar


def test_unknown_total_warning_and_failure(tmp_path, capsys):
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with StageLog(tmp_path / "s.log", stream=out, lines_per_task=3) as log:
            log.start("probes", None, "probes")
            for _ in range(7):
                log.advance()
            log.warning("close to the limit")
            raise RuntimeError("disk full")
    # A failed run's log stays under its pending name; the log's own name keeps the last good run's.
    assert not (tmp_path / "s.log").exists()
    lines = pending_path(tmp_path / "s.log").read_text().splitlines()
    assert lines[0] == "probes: ? probes"
    assert [ln.split(",")[0] for ln in lines[1:3]] == ["probes: 3 probes", "probes: 6 probes"]
    assert lines[3:] == ["warning: close to the limit", "failed: RuntimeError: disk full"]
    assert capsys.readouterr().err == "warning: close to the limit\n"


def test_disabled_log_writes_nothing(tmp_path):
    out = io.StringIO()
    with StageLog(tmp_path / "sub/s.log", enabled=False, stream=out) as log:
        log.start("windows", 3, "windows")
        log.advance(3, 10)
        log.line("x")
        log.warning("y")
    assert out.getvalue() == "" and not (tmp_path / "sub").exists()


def test_status_rate_and_eta():
    log = StageLog(None, stream=io.StringIO())
    log.start("w", 100, "windows")
    log.advance(25, tokens=5000)
    assert log.status(elapsed=10.0) == "w: 25/100 windows (25%), 500 tok/s, elapsed 10s, ETA 30s"
    log.start("m", 8, "matrices")
    log.advance(2)
    assert log.status(elapsed=4.0) == "m: 2/8 matrices (25%), 0.50 matrices/s, elapsed 4s, ETA 12s"
    assert [format_seconds(s) for s in (0.4, 59, 61, 3599, 3600, 7325)] == ["0s", "59s", "1m01s", "59m59s",
                                                                             "1h00m", "2h02m"]


# ------------------------------------------------- the library's progress calls
@pytest.mark.parametrize("world_size", [1, 3])
def test_window_scoring_reports_every_window_and_target_once(world_size):
    tokens, tables, model = make_stream(200, 16, seed=3), make_tables(16), TinyBankLM(16, seed=1)
    for score, task in ((score_sliding_windows, "sliding windows"),
                        (score_nonoverlapping, "non-overlapping windows")):
        windows = targets = 0
        for rank in range(world_size):  # each rank's share, as under torchrun (sums stay per rank)
            seen = Recorder()
            score(model, tokens, tables, WINDOWS, rank=rank, world_size=world_size, progress=seen)
            ((name, total, unit),) = seen.starts
            assert (name, unit) == (task, "windows") and seen.totals()[0] == total
            windows += total
            targets += seen.totals()[1]
        result = score(model, tokens, tables, WINDOWS)
        assert (windows, targets) == (result.windows, result.sums.scored_tokens)


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_ttt_reports_each_chunk_with_its_targets():
    tokens, tables = make_stream(300, 16, seed=5), make_tables(16)
    seen = Recorder()
    result = run_ttt(TinyBankLM(16, seed=2), tokens, tables, WINDOWS, TTT_SGD, progress=seen)
    assert seen.starts == [("ttt chunks", result.num_chunks, "chunks")]
    assert [n for n, _ in seen.advances] == [1] * result.num_chunks
    assert seen.totals()[1] == result.sums.scored_tokens == tokens.numel() - 1


def test_calibration_sampling_and_quantisation_report_their_work():
    from tests.helpers.models import QUANT_PARAMS as PARAMS, hessian_config, tiny_model

    model, cpu = tiny_model(), torch.device("cpu")
    batches = [torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = Recorder()
    hs = collect_hessians(model, batches, cpu, contextlib.nullcontext, seen)
    assert seen.starts == [("calibration", 3, "batches")] and seen.totals() == (3, hs.num_tokens) == (3, 96)
    seen = Recorder()
    collect_hessians(model, iter(batches), cpu, contextlib.nullcontext, seen)
    assert seen.starts == [("calibration", None, "batches")] and seen.totals() == (3, 96)

    cfg = hessian_config(ar_num_seqs=5, ar_batch_seqs=2)  # batches of 2, 2, 1 sequences
    for rank in range(2):
        seen = Recorder()
        sampled = list(autoregressive_batches(model, cfg, rank, 2, cpu, seen))
        assert seen.starts == [("sampling", len(sampled), "batches")]
        assert seen.totals() == (len(sampled), sum(b.numel() for b in sampled))

    seen = Recorder()
    qcfg = from_params(QuantizeConfig, PARAMS, "quantize")
    result = quantize_state_dict(unbank_state_dict(model.state_dict(), model.cfg), hs.hessians, hs.num_tokens,
                                 qcfg, cpu, progress=seen)
    blocks = sum(row["class"] in ("attn", "mlp") for row in result.report)
    assert blocks > 0 and seen.starts == [("quantize (gptq)", blocks, "matrices")]
    assert seen.totals() == (blocks, 0) and len(seen.advances) < blocks  # one call per same-shape group
