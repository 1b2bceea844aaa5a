"""Stage train: train shards → artifacts/train/{model.pt,averages.pt,config.json,metrics.json,train.log}.

Run by ``python -m pgolf.pipeline.launcher N stages.train`` (torchrun underneath). Curves go
to artifacts/train/live (dvclive), their picture to artifacts/train/loss.png.
The resume state is kept in artifacts/train_resume/state.pt (a persistent DVC
output): re-running after a crash or ``kill -9`` continues from the last
saved step (pgolf/train/resume.py). The work is pgolf/train/run.py.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.distributed import init_distributed
from pgolf.model.gpt import ModelConfig
from pgolf.quant.grid import grid_bits_from_params
from pgolf.pipeline.launch import launch_config, launch_facts, run_distributed, stage_main
from pgolf.train.config import TrainConfig
from pgolf.train.optim import OptimConfig
from pgolf.train.run import train_to_files


def run(p: dict, root: Path = Path("."), rank: int = 0, world_size: int = 1, local_rank: int = 0,
        curves: bool = True) -> dict:
    """Train and (on rank 0) write the outputs under ``root``; return the metrics.

    ``curves=False`` skips the dvclive curves and loss.png (bench/pipeline.py runs where dvclive is absent).
    """
    model_cfg = from_params(ModelConfig, p, "model")
    optim_cfg = from_params(OptimConfig, p, "optim")
    cfg = from_params(TrainConfig, p, "train")
    grid = grid_bits_from_params(p)  # late QAT trains on the export grid
    ctx = init_distributed(rank, world_size, local_rank, launch_config(p).device)
    return train_to_files(root, model_cfg, optim_cfg, cfg, grid, ctx, curves)


@stage_main
def main() -> None:
    m = run_distributed(run)
    if launch_facts()[0] == 0:
        swa = m["holdout_loss_swa"]
        print(f"train: {m['steps']} steps, {m['tokens']:,} tokens in {m['train_seconds']:.1f} s "
              f"({m['tokens_per_s'] or 0:,.0f} tok/s); held-out loss live {m['holdout_loss_live']:.4f} "
              f"ema {m['holdout_loss_ema']:.4f} swa {'n/a' if swa is None else f'{swa:.4f}'} "
              f"-> {m['final_weights']}")


if __name__ == "__main__":
    main()
