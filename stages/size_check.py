"""Stage size_check: artifacts/bundle/train_gpt.py + artifacts/quant/model.ptz ≤ 16,000,000 → artifacts/size.json.

What is counted is defined in pgolf/submission/size.py. Over the limit, the stage
exits non-zero when ``size.enforce`` is true; otherwise ``fits: false`` is
recorded (``dvc metrics show``) and the eval stages print a warning.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.errors import PgolfError
from pgolf.io import write_json_atomic
from pgolf.pipeline.launch import params, stage_main
from pgolf.pipeline.paths import ARTIFACT, SIZE_JSON
from pgolf.submission.size import SizeConfig, report_dict, size_report


def run(p: dict, root: Path = Path(".")) -> dict:
    """Measure, write ``size.json`` under ``root`` and return it; PgolfError if over and enforced."""
    cfg = from_params(SizeConfig, p, "size")
    report = report_dict(size_report(root / ARTIFACT, root))
    write_json_atomic(root / SIZE_JSON, report)
    if not report["fits"] and cfg.enforce:
        raise PgolfError(
            f"{SIZE_JSON}: submission is {report['total_bytes']:,} bytes (code {report['code_bytes']:,} + "
            f"model {report['model_bytes']:,}), over the {report['limit']:,}-byte limit by "
            f"{-report['headroom']:,}")
    return report


@stage_main
def main() -> None:
    r = run(params())
    status = "fits" if r["fits"] else "OVER THE LIMIT (size.enforce is false)"
    print(f"size_check: code {r['code_bytes']:,} ({len(r['code_files'])} files) + model "
          f"{r['model_bytes']:,} = {r['total_bytes']:,} bytes of {r['limit']:,}: {status}, "
          f"headroom {r['headroom']:,}")


if __name__ == "__main__":
    main()
