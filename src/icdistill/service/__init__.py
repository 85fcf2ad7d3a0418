"""``icd serve``: online ICD over HTTP, with a model or a person as teacher.

Layout: ``config`` (settings), ``cli`` (the command), ``engine`` (the loop host) with ``answering``,
``teacher_queue``, ``leases``, ``labelling`` and ``import_export``, ``store`` and ``store_pg`` (queries,
queue, ledger), ``human`` (the labelling queue), ``routes`` and ``schemas`` (JSON API), ``label_page``
(/label), ``archive``, ``auth``, ``guard``, ``validate``, ``images``, ``errors``, ``metrics``, ``app``
(FastAPI + uvicorn).
"""

from icdistill.service.config import ServeConfig

__all__ = ["ServeConfig"]
