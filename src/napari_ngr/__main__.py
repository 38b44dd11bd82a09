"""``python -m napari_ngr``: the command line (see :mod:`napari_ngr.cli`)."""

import sys

from .cli import main

sys.exit(main())
