"""Exporting the pool as a zip archive (demos.jsonl and images) and importing one."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any, TypeVar

from icdistill.service.archive import ImportLimits, read_import
from icdistill.service.cpu import off_loop
from icdistill.types import (
    image_to_png,
)

T = TypeVar("T")


class _ImportExport:
    """How ``Engine`` exports its pool as an archive and imports one (a mixin over the engine's
    state)."""

    # ------------------------------------------------------------------ export / import
    async def export_archive(self) -> bytes:
        return await self.thread.call(self._export)

    def _export(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            lines = []
            for d in sorted(self.pool.demos(), key=lambda d: d.id):
                rec = self._demo(d, image=False)
                rec["votes"] = d.provenance.get("votes") or {}
                if d.image is not None:
                    rec["image"] = f"images/{d.id}.png"
                    z.writestr(rec["image"], image_to_png(d.image))
                lines.append(json.dumps(rec))
            z.writestr("demos.jsonl", "\n".join(lines) + ("\n" if lines else ""))
        return buf.getvalue()

    async def import_archive(self, data: bytes) -> dict[str, Any]:
        cfg = self.cfg
        limits = ImportLimits(cfg.max_pixels, cfg.max_import_pixels, cfg.max_import_bytes, cfg.max_import_lines)
        records = await off_loop(read_import, data, limits)
        out = await self.thread.call(self._add_demos, records)
        statuses: dict[str, int] = {}
        for status in out["statuses"]:
            statuses[status] = statuses.get(status, 0) + 1
        return {"imported": statuses.get("added", 0), "statuses": statuses, "pool_size": out["pool_size"]}
