"""Ray job entrypoint for the explain batch job.

    ray job submit --working-dir . -- python jobs/explain.py s3://archive/ --checkpoint s3://runs/best.pt \\
        --out s3://runs/explain --method gradcam --gpus-per-worker 1 --resume
    python jobs/explain.py --smoke-test --out /tmp/smoke-explain      # seconds to a minute, on phantoms

Options are those of ``mammo-ray explain``; this file only calls the CLI
(``--smoke-test``: ``mammo_ray.smoke``, shared by every job).
"""
from __future__ import annotations

import sys

from mammo_ray.smoke import run_job

if __name__ == "__main__":
    sys.exit(run_job("explain", sys.argv[1:]))
