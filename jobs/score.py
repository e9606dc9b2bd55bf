"""Ray job entrypoint for the score batch job (an archive scored, no CAMs).

    ray job submit --working-dir . -- python jobs/score.py s3://archive/ --checkpoint s3://runs/best.pt \\
        --out s3://runs/score --gpus-per-worker 1 --resume
    python jobs/score.py --smoke-test --out /tmp/smoke-score      # seconds to a minute, on phantoms

Options are those of ``mammo-ray score``; this file only calls the CLI
(``--smoke-test``: ``mammo_ray.smoke``, shared by every job).
"""
from __future__ import annotations

import sys

from mammo_ray.smoke import run_job

if __name__ == "__main__":
    sys.exit(run_job("score", sys.argv[1:]))
