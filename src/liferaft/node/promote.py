"""Automatic promotion of caught-up learners (docs/operations.md, "Scaling a running
cluster").

With ``[cluster] auto_promote = true`` the leader promotes a learner to voter once the
learner's match index has stayed within ``snapshot_entries // 10`` entries of the
leader's last index for at least one election timeout. The rule is a policy over the
core's replication progress, not part of the protocol, so it lives in the shell: the
core loop asks it at every round in which ticks passed, and it proposes the promotion
through ``Raft.propose_conf_change``, the path the ``member_promote`` admin op takes.

Time is the node's own tick count (one tick per heartbeat interval), never wall time, so
the rule is a pure function of what it is shown (``CatchUp``). One change at a time: a
proposal the core refuses (another change not yet committed, a leadership transfer, no
entry of this term committed yet) is simply tried again at a later tick.
"""

from __future__ import annotations

import logging

from liferaft.config import Settings
from liferaft.core import ConfChange, ConfChangeType, ProposalRefused, Raft, Role, Status
from liferaft.observability.logs import event

log = logging.getLogger("liferaft.node")


class CatchUp:
    """Which learner has been caught up for long enough: ``bound`` entries behind the
    leader's last index at most, for ``hold`` ticks at least."""

    def __init__(self, *, bound: int, hold: int) -> None:
        self.bound = bound
        self.hold = hold
        self._term = -1  # the leadership term the clocks below were started in
        self._since: dict[str, int] = {}  # learner -> tick since when it is caught up

    def due(self, now: int, st: Status) -> str | None:
        """The learner to promote at tick ``now``, given the core's status (the first by
        id if several are due), or None. Called at any ticks, in order; a learner seen
        behind (or not answering yet: match 0) starts its clock again."""
        if st.role is not Role.LEADER or st.term != self._term:
            self._since.clear()  # progress is rebuilt by each new leadership
            self._term = st.term if st.role is Role.LEADER else -1
            if st.role is not Role.LEADER:
                return None
        due: str | None = None
        for learner in sorted(st.membership.learners):
            pr = st.peers.get(learner)
            if pr is None or pr.match == 0 or st.last_index - pr.match > self.bound:
                self._since.pop(learner, None)
                continue
            since = self._since.setdefault(learner, now)
            if due is None and now - since >= self.hold:
                due = learner
        for gone in self._since.keys() - st.membership.learners:
            del self._since[gone]  # promoted or removed
        return due


class AutoPromoter:
    """Applies ``CatchUp`` to the core, from the core loop (which owns the core)."""

    def __init__(self, rule: CatchUp) -> None:
        self.rule = rule

    @classmethod
    def of(cls, settings: Settings, election_ticks: int) -> AutoPromoter | None:
        """The promoter ``settings`` ask for: None unless ``[cluster] auto_promote``."""
        if not settings.cluster.auto_promote:
            return None
        bound = settings.raft.snapshot_entries // 10
        return cls(CatchUp(bound=bound, hold=election_ticks))

    def on_ticks(self, raft: Raft, now: int) -> None:
        """Ticks passed (``now`` counts them all): propose a promotion if one is due.
        Only between Readies (the core takes no proposal while one is outstanding)."""
        if raft.role is not Role.LEADER or not raft.membership.learners:
            return  # the common case costs no status() call (a new term resets the rule)
        st = raft.status()
        learner = self.rule.due(now, st)
        if learner is None:
            return
        try:
            index = raft.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, learner))
        except ProposalRefused:
            return  # another change in progress, or a transfer: the rule asks again
        event(
            log,
            "learner_promoted",
            member=learner,
            match=st.peers[learner].match,
            last_index=st.last_index,
            index=index,
        )
