"""Shards of a stream (``icd run --shard K/N``): which items of the stream a worker answers.

An item belongs to shard ``hash(item id) mod N``: the split depends on nothing but the item's id, so
it is the same whatever ``--n`` or ``--seed`` and on resume, and the N shards of one stream hold each of
its items exactly once. A shard's stream is the whole stream (``--n`` items in ``--seed``'s order) with
the other shards' items left out: a shard of a longer stream extends the shard of a shorter one, and
its positions (0, 1, ... in the shard's own log) map back to positions of the whole stream
(``whole_positions``). Shards share work only through one pool, so a shard needs a shared pool
(PostgreSQL): N SQLite pools would be N separate runs with N warm-ups and N budgets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from icdistill.data.dataset import Dataset
from icdistill.data.stream import stream_order
from icdistill.errors import ICDError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1..``count``) of a stream split ``count`` ways."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        k, sep, n = str(text).strip().partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise ICDError(f"--shard takes K/N (shard K of N, e.g. 2/4), got {text!r}")
        shard = cls(int(k), int(n))
        if shard.count < 1 or not 1 <= shard.index <= shard.count:
            raise ICDError(f"--shard {text}: K must be between 1 and N (the shards of 4 are 1/4 .. 4/4)")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder_name(self) -> str:
        """The shard's run folder under a whole run's folder (``icd run --ray``)."""
        return f"shard-{self.index}-of-{self.count}"

    def holds(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index


def shard_of(item_id: str, count: int) -> int:
    """The shard (1..count) an item id belongs to: a digest, so the same on every host and Python."""
    digest = hashlib.sha1(item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def check_shard(shard: str | None, pool: str | None) -> None:
    """A valid ``--shard``, and a shared pool beside it (raises ``ICDError``)."""
    if shard is None:
        return
    Shard.parse(shard)
    if pool is None:
        raise ICDError(
            f"--shard {shard} splits the stream between workers that share one pool: add --pool "
            "postgresql://... (a run's own pool.sqlite is not shared, so each shard would start from an "
            "empty pool with its own budget)"
        )


def _item_id(dataset: Dataset, i: int) -> str:
    return dataset._query(i).id  # the id without decoding the image


def whole_positions(dataset: Dataset, order: list[int], shard: Shard) -> list[int]:
    """The positions of the whole stream (``order``) that ``shard`` answers, in stream order: the
    shard's position p is the whole stream's position ``whole_positions(...)[p]``."""
    return [pos for pos, i in enumerate(order) if shard.holds(_item_id(dataset, i))]


def run_order(
    dataset: Dataset, n: int | None, seed: int, shuffle: bool, shard: str | None = None
) -> list[int]:
    """The item indices a run answers, in its order: the stream, or its shard's part of it."""
    order = stream_order(len(dataset), n, seed, shuffle)
    if shard is None:
        return order
    return [order[p] for p in whole_positions(dataset, order, Shard.parse(shard))]
