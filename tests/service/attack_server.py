"""Runs `icd serve` as the command does (``run_server``: its listener, its limits) in its own process,
with fake models. Usage: attack_server.py POOL PORT SETTINGS_JSON; the settings are ServeConfig fields,
plus ``student_delay_s`` (each student pass takes this long) and ``teacher`` ("human", "fake" or a
teacher spec)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from fakes import FakeEmbedder, FakeStudent, FakeTeacher  # noqa: E402
from icdistill.models.registry import resolve_teacher  # noqa: E402
from icdistill.runner import Parts  # noqa: E402
from icdistill.service.app import create_app  # noqa: E402
from icdistill.service.config import ServeConfig  # noqa: E402
from icdistill.service.server import run_server  # noqa: E402
from service_helpers import KEY  # noqa: E402


class SlowStudent(FakeStudent):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def predict(self, query, demos):  # type: ignore[no-untyped-def]
        time.sleep(self.delay_s)
        return super().predict(query, demos)


def main() -> None:
    pool, port, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    delay = float(settings.pop("student_delay_s", 0.0))
    teacher = settings.pop("teacher", "fake")
    fields = {"api_key": KEY, "gate": "always", **settings, "pool": pool, "port": port, "teacher": teacher}
    if teacher == "fake":
        fields["teacher"] = "fake"
    cfg = ServeConfig(**fields)
    model = None if cfg.human_teacher else FakeTeacher() if teacher == "fake" else resolve_teacher(teacher)
    app = create_app(cfg, Parts(SlowStudent(delay) if delay else FakeStudent(), model, FakeEmbedder()))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_server(app, cfg, log_level="info")


if __name__ == "__main__":
    main()
