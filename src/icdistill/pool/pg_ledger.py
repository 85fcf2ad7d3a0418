"""The PostgreSQL pool's budget ledger: teacher calls and dollars charged across every worker, under
the caps of ``--max-calls`` and ``--max-cost``."""

from __future__ import annotations

from typing import Any

from icdistill.pool.pg_schema import DB_NOW


class _Ledger:
    """The ledger part of ``PostgresPool`` (a mixin: it works on the pool's own state)."""

    def ledger_state(self) -> dict[str, Any]:
        row = self._retrying(
            "reading the ledger",
            lambda: self._db.execute(
                "SELECT calls, cost_usd, max_calls, max_cost_usd, dearest_call_usd FROM icd_ledger WHERE name = %s",
                (self.ledger,),
            ).fetchone(),
        )
        return {
            "calls": int(row[0]),
            "cost_usd": float(row[1]),
            "max_calls": row[2],
            "max_cost_usd": row[3],
            "dearest_call_usd": float(row[4]),
        }

    def _charge(self) -> bool:
        """One call on the global ledger, if its caps allow it; the caller holds the call's claim. A
        call's cost is known only after it, so the dollar cap reserves the dearest call any worker has
        paid (as ``CappedGate`` does for one process) for every call in flight, this one included:
        each live claim."""
        with self._db.transaction():
            # the ledger row first, then the claims, in a later statement: one UPDATE that waited on
            # the row counted the claims as of its start, missing those of the worker it waited for
            self._db.execute("SELECT 1 FROM icd_ledger WHERE name = %s FOR UPDATE", (self.ledger,))
            row = self._db.execute(
                "UPDATE icd_ledger SET calls = calls + 1 WHERE name = %s AND (max_calls IS NULL OR calls < max_calls) "
                "AND (max_cost_usd IS NULL OR cost_usd + dearest_call_usd * ("
                f"(SELECT COUNT(*) FROM icd_claims WHERE expires >= {DB_NOW})) <= max_cost_usd) RETURNING calls",
                (self.ledger,),
            ).fetchone()
        return row is not None
