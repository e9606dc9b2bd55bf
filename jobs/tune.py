"""Ray job entrypoint for a Tune sweep.

    ray job submit --working-dir . -- python jobs/tune.py --data DIR --out DIR --config sweep.yaml
    python jobs/tune.py --smoke-test --out /tmp/smoke-tune        # about a minute, on phantoms

Options are those of ``mammo-ray tune``; this file only calls the CLI
(``--smoke-test``: ``mammo_ray.smoke``, shared by every job).
"""
from __future__ import annotations

import sys

from mammo_ray.smoke import run_job

if __name__ == "__main__":
    sys.exit(run_job("tune", sys.argv[1:]))
