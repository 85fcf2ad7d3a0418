"""``python -m icdistill`` runs the ``icd`` command."""

import sys

from icdistill.cli import main

sys.exit(main())
