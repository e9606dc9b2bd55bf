"""Ray job entrypoint for evaluation.

    ray job submit --working-dir . -- python jobs/evaluate.py --sweep OUT --data DIR --external EXT --out DIR

Options are those of ``mammo-ray evaluate``; this file only parses and calls.
"""
from __future__ import annotations

import sys

from mammo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
