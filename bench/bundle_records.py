"""A records folder to run a bundle in: train_gpt.py for a profile + a pipeline's shards in the challenge's layout.

    python bench/bundle_records.py --root . --profile record --out .records \
        --set hessians.train_batches=4

builds the bundle (pgolf/submission/bundle.py) of the composed profile (conf/ + ``--set``
overrides, embedded in the bundle) and copies ``ROOT/data/shards/{train,val}_*.bin`` to
``OUT/<bundle.data_dir>/fineweb_{train,val}_*.bin`` and ``ROOT/data/tokenizer/tokenizer.model`` to
``OUT/<bundle.tokenizer_path>``: the layout the challenge's own data has. Then, on the machine:

    cd .records && torchrun --standalone --nproc_per_node=1 train_gpt.py \
        --set train.max_train_seconds=120 2>&1 | tee run.log

(run-time ``--set`` overrides change nothing counted). Prints the bundle's bytes as JSON and a table;
without ``--out`` only those (no data needed): ``python bench/bundle_records.py --profile record``;
``--modules`` adds each packed module's minified bytes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.submission.bundle import build_bundle  # noqa: E402
from pgolf.tools.profiles import compose  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="pipeline root with data/shards and data/tokenizer")
    parser.add_argument("--profile", default="record")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides embedded in the bundle")
    parser.add_argument("--out", default=None, help="records folder to (re)create (default: only print the bytes)")
    parser.add_argument("--modules", action="store_true", help="also a table of each packed module's minified bytes")
    args = parser.parse_args()
    root = Path(args.root)
    params = compose(args.profile, args.set)
    bundle = build_bundle(Path(__file__).resolve().parents[1], params, params["bundle"]["strip_docstrings"])
    m = {k: v for k, v in bundle.metrics().items() if k != "modules"}
    if args.modules:
        module_table(bundle.packed_bytes)
    if args.out is None:
        report(args, m, shards=None)
        return
    out = Path(args.out)
    shards = sorted((root / "data/shards").glob("*_[0-9]*.bin"))
    tokenizer = root / "data/tokenizer/tokenizer.model"
    if not shards or not tokenizer.is_file():
        sys.exit(f"error: {root}: needs data/shards/*.bin and data/tokenizer/tokenizer.model (run the data stages)")
    shutil.rmtree(out, ignore_errors=True)
    data_dir = out / params["bundle"]["data_dir"]
    data_dir.mkdir(parents=True)
    for shard in shards:
        shutil.copyfile(shard, data_dir / f"fineweb_{shard.name}")
    (out / params["bundle"]["tokenizer_path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, out / params["bundle"]["tokenizer_path"])
    (out / "train_gpt.py").write_text(bundle.text, encoding="utf-8")
    report(args, m, shards=len(shards))


def report(args: argparse.Namespace, m: dict, shards: int | None) -> None:
    print(json.dumps({"profile": args.profile, "overrides": args.set, "shards": shards, **m}, indent=2))
    print(f"{'profile':10s} {'source':>10s} {'packed':>10s} {'lzma2':>10s} {'counted':>10s}")
    print(f"{args.profile:10s} {m['source_bytes']:>10,} {m['raw_bytes']:>10,} {m['archive_bytes']:>10,} "
          f"{m['counted_bytes']:>10,}")


def module_table(files: dict[str, int]) -> None:
    """Each packed module's minified bytes, largest first (what to look at to shrink the bundle)."""
    print(f"{'module':40s} {'packed':>8s}")
    for path, size in sorted(files.items(), key=lambda kv: -kv[1]):
        print(f"{path:40s} {size:>8,}")


if __name__ == "__main__":
    main()
