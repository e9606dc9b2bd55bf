"""``python -m mammo_ray.cli``: the same as the ``mammo-ray`` command."""
import sys

from mammo_ray.cli import main

sys.exit(main())
