"""`ClusterState`: the board where replicas post their reports and the ingress reads them.

Ray Serve sends each call to one replica, so the ingress cannot ask "every replica" anything; the
replicas push instead. A report older than `stale_after` seconds belongs to a replica that died (or
was replaced) and is dropped, so a dead replica disappears from `/metrics` and `/v1/models` within
that time. Runs as a one-replica Ray Serve deployment that reserves no CPU.
"""
from __future__ import annotations

import time

from loragate.cluster.report import ReplicaReport


class ClusterState:
    def __init__(self, stale_after: float = 3.0) -> None:
        self.stale_after = stale_after
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica_id] = (time.monotonic(), report)

    def forget(self, replica_id: str) -> None:
        """A replica shutting down cleanly leaves at once instead of going stale."""
        self._reports.pop(replica_id, None)

    def snapshot(self) -> list[ReplicaReport]:
        """Live replicas' latest reports, ordered by replica id."""
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] <= self.stale_after}
        return [v[1] for _, v in sorted(self._reports.items())]
