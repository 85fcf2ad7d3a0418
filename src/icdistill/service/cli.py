"""The ``icd serve`` command: the service's config from the command line (a bad one is a usage error,
before any model loads), then the server."""

from __future__ import annotations

import argparse

from icdistill.errors import ICDError
from icdistill.service.config import config_from_args


def cmd_serve(args: argparse.Namespace) -> int:
    from icdistill.errors import UsageError
    from icdistill.service.app import serve

    try:
        cfg = config_from_args(args)
    except ICDError as e:
        raise UsageError(str(e)) from e  # a bad command line: exit code 2, before any model loads
    serve(cfg)
    return 0
