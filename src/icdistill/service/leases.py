"""Leases of servers sharing one database: heartbeats keep this server's work in flight, and a sweep
adopts the expired work of a server that went silent and wakes waiters another server finished."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from icdistill.pool import PostgresPool
from icdistill.service.store import (
    PENDING_HUMAN,
    PENDING_TEACHER,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Leases:
    """How ``Engine`` shares one database with other servers: heartbeats for the work in flight, and
    a sweep that adopts a silent server's expired work (a mixin over the engine's state)."""

    # ------------------------------------------------------------------ many servers, one database
    async def _sweep_loop(self) -> None:
        tick = min(1.0, self.cfg.claim_lease_s / 3)
        while True:
            try:
                # on their own connections, off the loop thread: a queue of student passes there
                # must not let this live server's leases run out. Only the work in flight here: one
                # whose attempt failed (a lost connection) lapses and is adopted again, not held forever
                await asyncio.to_thread(self._heartbeat, sorted(self._inflight))
                orphans, finished = await self.thread.call(self._sweep)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep of the shared store failed; retrying")
                orphans, finished = [], {}
            for qid, row in finished.items():
                self._wake(qid, row)
            for qid in orphans:
                if qid not in self._inflight:
                    self._spawn(qid)
            if orphans:
                log.info("adopted %d teacher requests of a server that went silent", len(orphans))
            await asyncio.sleep(tick)

    def _heartbeat(self, query_ids: list[str]) -> None:
        assert isinstance(self.pool, PostgresPool)
        self.store.heartbeat(query_ids)
        self.pool.renew_claims(query_ids)

    def _sweep(self) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Adopt expired work, refresh the stats mirrors, and find waited-on queries another server
        closed (loop thread)."""
        assert isinstance(self.pool, PostgresPool)
        orphans = self.store.adopt_orphans()
        self.pool.refresh()
        finished: dict[str, dict[str, Any]] = {}
        for qid in list(self._waiters):
            row = self.store.get(qid)
            if row is not None and row["state"] not in (PENDING_TEACHER, PENDING_HUMAN):
                finished[qid] = self._public(row, None)
        counts, ledger, pool_ledger = self.store.counts(), self.store.ledger_totals(), self.pool.ledger_state()
        with self._stats_lock:
            self._counts, self._ledger, self._pool_ledger = counts, ledger, pool_ledger
        return orphans, finished
