"""``icd serve``: online ICD over HTTP, with a model or a person as teacher.

Layout: ``config`` (settings), ``engine`` (the loop host), ``store`` (queries, queue, ledger in SQLite),
``human`` (the labelling queue), ``routes`` and ``schemas`` (JSON API), ``label_page`` (/label),
``auth``, ``images``, ``metrics``, ``app`` (FastAPI + uvicorn).
"""

from icdistill.service.config import ServeConfig

__all__ = ["ServeConfig"]
