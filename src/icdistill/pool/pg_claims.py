"""Buying a label once across workers: claims on an image+prompt in the PostgreSQL pool (leased on the
database's clock, renewed by a heartbeat, taken over by a resumed owner), and ``ClaimingAnnotator``,
which claims before calling the teacher and reuses what another worker bought."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from icdistill.pool.pg_schema import CLAIMS_CHANNEL, DB_NOW, ClaimResult
from icdistill.types import Query, image_digest


class _Claims:
    """The claims part of ``PostgresPool`` (a mixin: it works on the pool's own state)."""

    # ------------------------------------------------------------------ buying a label
    def claim(self, query: Query) -> ClaimResult:
        """Before calling the teacher: "claimed" (go ahead, one call charged to the global ledger),
        "pooled" (another worker's demo of this image+prompt exists: reuse it), "busy" (another
        worker is buying it now), "budget" (the ledger's cap is reached). Leases are on the
        database's clock."""
        return self._retrying("claiming an item", lambda: self._claim_once(query))

    def _claim_once(self, query: Query) -> ClaimResult:
        if query.image is None:
            # nothing to buy once, but its call in flight must be a claim too: the other workers'
            # dollar checks reserve a call for each claim
            with self._db.transaction():
                self._db.execute(
                    "INSERT INTO icd_claims (image_digest, prompt, query_id, worker, expires) "
                    f"VALUES (%s, %s, %s, %s, {DB_NOW} + %s) "
                    "ON CONFLICT (image_digest, prompt) DO UPDATE SET expires = EXCLUDED.expires",
                    (self._text_claim(query), query.prompt, query.id, self.worker, self.lease_s),
                )
                if not self._charge():
                    self._release_text(query)
                    return "budget"
            return "claimed"
        digest = image_digest(query.image)
        with self._db.transaction():
            pooled = self._db.execute(
                "SELECT 1 FROM icd_annotations WHERE in_pool AND image_digest = %s AND prompt = %s",
                (digest, query.prompt),
            ).fetchone()
            if pooled is not None:
                return "pooled"
            got = self._db.execute(
                "INSERT INTO icd_claims (image_digest, prompt, query_id, worker, expires) "
                f"VALUES (%s, %s, %s, %s, {DB_NOW} + %s) "
                "ON CONFLICT (image_digest, prompt) DO UPDATE SET query_id = EXCLUDED.query_id, "
                "worker = EXCLUDED.worker, expires = EXCLUDED.expires "
                # this worker may take its own claim again for the same query only: a service
                # answers concurrent queries, and a twin of one in flight must wait for its label
                f"WHERE icd_claims.expires < {DB_NOW} OR (icd_claims.worker = EXCLUDED.worker "
                "AND icd_claims.query_id = EXCLUDED.query_id) RETURNING 1",
                (digest, query.prompt, query.id, self.worker, self.lease_s),
            ).fetchone()
            if got is None:
                return "busy"
            # the claimant may have committed its demo (deleting its claim) between our first look
            # and our insert: each statement sees the latest commits, so look again before buying
            pooled = self._db.execute(
                "SELECT 1 FROM icd_annotations WHERE in_pool AND image_digest = %s AND prompt = %s",
                (digest, query.prompt),
            ).fetchone()
            if pooled is not None:
                self._delete_claim(digest, query.prompt, " AND worker = %s", (self.worker,))
                return "pooled"
            if not self._charge():
                self._delete_claim(digest, query.prompt)
                return "budget"
        return "claimed"

    def _delete_claim(self, key: str, prompt: str, where: str = "", params: tuple[Any, ...] = ()) -> None:
        """Delete a claim and wake the workers waiting on it (at commit)."""
        self._db.execute(
            f"DELETE FROM icd_claims WHERE image_digest = %s AND prompt = %s{where}", (key, prompt, *params)
        )
        self._db.execute("SELECT pg_notify(%s, %s)", (CLAIMS_CHANNEL, key))

    def _claim_key(self, query: Query) -> str:
        return image_digest(query.image) if query.image is not None else self._text_claim(query)

    def _text_claim(self, query: Query) -> str:
        """The claim key of a query without an image (in the image digest column: never a digest)."""
        return f"text:{self.worker}:{query.id}"

    def _release_text(self, query: Query) -> None:
        self._delete_claim(self._text_claim(query), query.prompt)

    def release(self, query: Query) -> None:
        """Give a claim back without a demo (the teacher failed): another worker may buy it."""
        if query.image is None:
            self._retrying("releasing a claim", lambda: self._release_text(query))
            return
        # only this query's claim: the same item may be claimed anew, by this worker, for another query
        self._retrying(
            "releasing a claim",
            lambda: self._delete_claim(
                image_digest(query.image), query.prompt, " AND worker = %s AND query_id = %s", (self.worker, query.id)
            ),
        )

    def take_over_claims(self) -> int:
        """Make the claims of this owner's earlier workers this worker's (the caller holds the owner's
        exclusive lock, so they are dead): their items are claimed again at once, by this worker only.
        Their text-only claims (a reservation for a call in flight, keyed by worker) are dropped: that
        call is over. Returns how many image claims were taken over."""
        if not self.owner:
            return 0
        prefix = f"{self.owner}|"
        mine = "left(worker, length(%s)) = %s AND worker <> %s"

        def take() -> int:
            with self._db.transaction():
                self._db.execute(
                    f"DELETE FROM icd_claims WHERE {mine} AND image_digest LIKE 'text:%%'",
                    (prefix, prefix, self.worker),
                )
                return int(
                    self._db.execute(
                        f"UPDATE icd_claims SET worker = %s, expires = {DB_NOW} + %s WHERE {mine}",
                        (self.worker, self.lease_s, prefix, prefix, self.worker),
                    ).rowcount
                )

        return self._retrying("taking over claims", take)

    def wait_for_claim(self, query: Query, timeout: float) -> None:
        """Wait, by LISTEN, until the claim on ``query``'s item is deleted (its demo committed, or it
        was released) or ``timeout`` passes; the caller then claims again. No polling: one worker
        waiting costs the database nothing."""
        key = self._claim_key(query)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            # short slices: the listener also serves other threads (images, heartbeats, refreshes)
            if self._on_listener("waiting for a claim", lambda c: self._drain(c, min(left, 0.5), key)):
                return

    def renew_claims(self, query_ids: Sequence[str] | None = None) -> int:
        """Extend this worker's claims by ``lease_s`` (a heartbeat for teacher calls in flight), so a
        short lease still protects a long call while a dead worker's claims expire soon; only those
        of ``query_ids`` when given (a claim whose release failed lapses). Any thread: it runs on the
        listener, not on the work connection, so a worker busy elsewhere still renews on time."""
        sql, params = (
            f"UPDATE icd_claims SET expires = {DB_NOW} + %s WHERE worker = %s",
            [self.lease_s, self.worker],
        )
        if query_ids is not None:
            sql, params = sql + " AND query_id = ANY(%s)", [*params, list(query_ids)]
        return self._on_listener("renewing claims", lambda c: int(c.execute(sql, params).rowcount))

