"""Run stages with the scripted engine of test_stages12 inside a launcher (torchrun).

    torchrun --nproc_per_node 2 tests/_dist_worker.py WORKDIR STAGE[,STAGE] [key=value ...]

Environment: FAIL_RANK=r and FAIL_AFTER=n make rank r die (KeyboardInterrupt, as a kill)
after n engine batches. Used by tests/test_distributed.py; not a test itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_stages12 import Scripted  # noqa: E402

from ospo import config, dist  # noqa: E402
from ospo.rundir import RunDir  # noqa: E402
from ospo.stages import perturb, prompts  # noqa: E402


def main() -> None:
    workdir, stages, *overrides = sys.argv[1:]
    dist.init()
    cfg = config.load(HERE.parent / "configs" / "tiny.yaml", overrides)
    fail_after = None
    if os.environ.get("FAIL_RANK") is not None and int(os.environ["FAIL_RANK"]) == dist.rank():
        fail_after = int(os.environ["FAIL_AFTER"])
    eng = Scripted(fail_after=fail_after)
    for name in stages.split(","):
        mod = {"prompts": prompts, "perturb": perturb}[name]
        mod.run(cfg, RunDir(workdir), 0, lambda: eng)


if __name__ == "__main__":
    main()
