"""Training loss against tokens seen, from train.log files, in one PNG.

    python bench/loss_curves.py --out docs/bench/loss_curves.png \\
        "CPU default=docs/bench/cpu_default_train.log" "H200 record shape=docs/bench/h200-session2/gpu_smoke_200s_train.log"

Each log is the train stage's log (``artifacts/train/train.log``): its header
line gives tokens per step, each ``step N/M loss X`` line one point. The x axis
is logarithmic so a 4,096-token CPU step and a 786,432-token GPU step share it.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.tools.plots import plot_lines  # noqa: E402

_TOKENS_PER_STEP = re.compile(r"([\d,]+) tokens/step")
_STEP = re.compile(r"^step (\d+)/\d+ loss ([0-9.]+)")


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """(tokens seen, loss) per logged step; a log without its header line is an error."""
    text = path.read_text(encoding="utf-8").splitlines()
    per_step = next((int(m.group(1).replace(",", "")) for line in text
                     if (m := _TOKENS_PER_STEP.search(line))), None)
    if per_step is None:
        raise SystemExit(f"{path}: no 'tokens/step' header line; is this a train.log?")
    points = [(int(m.group(1)) * per_step, float(m.group(2))) for line in text if (m := _STEP.match(line))]
    if not points:
        raise SystemExit(f"{path}: no 'step N/M loss X' lines")
    return [p[0] for p in points], [p[1] for p in points]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curves", nargs="+", metavar="LABEL=TRAIN_LOG")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    series = {}
    for item in args.curves:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected LABEL=path/to/train.log")
        series[label] = read_curve(Path(path))
    plot_lines(args.out, series, "training loss (embedded corpus)", "tokens seen", "loss (nats)", logx=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
