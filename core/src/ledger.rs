//! The offset ledger: per partition, which Kafka offsets may be committed.
//!
//! The commit position of a partition is one past the highest offset such that every record
//! at or below it was acknowledged, rejected and handled by policy, or never pushed (Kafka
//! offsets have gaps). A record still in flight, or rejected under the `fail` policy, holds
//! the position below it.

use std::collections::{BTreeMap, VecDeque};

use crate::event::RejectReason;
use crate::record::{RecordCoords, TopicPartition};

/// The identity of one push of one record: a record pushed again after a rewind gets a new
/// id, so an acknowledgement for the old copy is never credited to the new one.
pub(crate) type RecordId = u64;

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Pushed, not yet acknowledged (or awaiting a dead-letter confirmation).
    Pending,
    /// Acknowledged, skipped, or dead-lettered: the offset may pass.
    Done,
    /// Rejected under the `fail` policy: the offset must not pass.
    Failed(RejectReason),
}

#[derive(Debug)]
struct Entry {
    offset: i64,
    id: RecordId,
    state: State,
}

#[derive(Debug, Default)]
struct Partition {
    /// Last position known to be committed in Kafka (from assign or a confirmed commit).
    committed: Option<i64>,
    /// First offset pushed since assign or rewind, the rewind target when nothing was
    /// committed.
    first_pushed: Option<i64>,
    /// Highest offset pushed since assign or rewind.
    last_pushed: Option<i64>,
    /// Commit position: every record below it is resolved.
    position: Option<i64>,
    /// Records not yet passed by `position`, in offset order.
    entries: VecDeque<Entry>,
}

impl Partition {
    fn advance(&mut self) {
        while let Some(e) = self.entries.front() {
            if e.state != State::Done {
                break;
            }
            // Never backwards: a consumer may start below a known committed position.
            self.position = Some(self.position.map_or(e.offset + 1, |p| p.max(e.offset + 1)));
            self.entries.pop_front();
        }
    }

    fn find(&mut self, offset: i64) -> Option<&mut Entry> {
        let i = self
            .entries
            .binary_search_by_key(&offset, |e| e.offset)
            .ok()?;
        self.entries.get_mut(i)
    }
}

/// Where a flush stands.
#[derive(Debug, PartialEq)]
pub(crate) enum FlushStatus {
    /// Every record up to the target is resolved.
    Complete,
    /// A record up to the target failed under the `fail` policy.
    Failed(RecordCoords, RejectReason),
    /// Records up to the target are still unresolved.
    Pending,
}

/// A flush target: per partition, the last offset pushed when the flush began.
pub(crate) type FlushTarget = BTreeMap<TopicPartition, i64>;

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    parts: BTreeMap<TopicPartition, Partition>,
}

/// A push out of offset order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OutOfOrder {
    pub(crate) last: i64,
}

impl Ledger {
    /// Starts tracking a partition; `committed` is its committed position, if known.
    pub(crate) fn assign(&mut self, tp: TopicPartition, committed: Option<i64>) {
        let p = self.parts.entry(tp).or_default();
        if committed.is_some() {
            p.committed = committed;
            if p.entries.is_empty() && p.last_pushed.is_none() {
                p.position = committed;
            }
        }
    }

    /// Stops tracking a partition.
    pub(crate) fn revoke(&mut self, tp: &TopicPartition) {
        self.parts.remove(tp);
    }

    pub(crate) fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.parts.contains_key(tp)
    }

    /// Checks that `offset` may be pushed next on `tp` (offsets increase per partition).
    pub(crate) fn check_order(&self, tp: &TopicPartition, offset: i64) -> Result<(), OutOfOrder> {
        match self.parts.get(tp).and_then(|p| p.last_pushed) {
            Some(last) if offset <= last => Err(OutOfOrder { last }),
            _ => Ok(()),
        }
    }

    /// Records a pushed record; call [`check_order`](Self::check_order) first.
    pub(crate) fn push(&mut self, tp: &TopicPartition, offset: i64, id: RecordId) {
        let p = self.parts.entry(tp.clone()).or_default();
        debug_assert!(p.last_pushed.is_none_or(|l| offset > l));
        p.last_pushed = Some(offset);
        p.first_pushed.get_or_insert(offset);
        // The position moves only when records resolve: a record the caller skipped
        // (never pushed) must not be committed past on the strength of a later push.
        p.entries.push_back(Entry {
            offset,
            id,
            state: State::Pending,
        });
    }

    /// Marks a record resolved (acknowledged, skipped or dead-lettered). Returns false if
    /// the ledger no longer tracks that push (revoked or rewound since).
    pub(crate) fn resolve(&mut self, tp: &TopicPartition, offset: i64, id: RecordId) -> bool {
        self.set(tp, offset, id, State::Done)
    }

    /// Marks a record failed under the `fail` policy.
    pub(crate) fn fail(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        id: RecordId,
        reason: RejectReason,
    ) -> bool {
        self.set(tp, offset, id, State::Failed(reason))
    }

    fn set(&mut self, tp: &TopicPartition, offset: i64, id: RecordId, state: State) -> bool {
        let Some(p) = self.parts.get_mut(tp) else {
            return false;
        };
        let Some(e) = p.find(offset) else {
            return false;
        };
        if e.id != id || e.state != State::Pending {
            return false;
        }
        e.state = state;
        p.advance();
        true
    }

    /// The id of the still-pending push of `offset` on `tp`, if any.
    pub(crate) fn pending_id(&mut self, tp: &TopicPartition, offset: i64) -> Option<RecordId> {
        let e = self.parts.get_mut(tp)?.find(offset)?;
        (e.state == State::Pending).then_some(e.id)
    }

    /// A confirmed Kafka commit.
    pub(crate) fn committed(&mut self, tp: &TopicPartition, position: i64) {
        if let Some(p) = self.parts.get_mut(tp) {
            if p.committed.is_none_or(|c| c < position) {
                p.committed = Some(position);
            }
        }
    }

    /// Commit positions of every partition that has one.
    pub(crate) fn positions(&self) -> Vec<(TopicPartition, i64)> {
        self.parts
            .iter()
            .filter_map(|(tp, p)| p.position.map(|pos| (tp.clone(), pos)))
            .collect()
    }

    /// The flush target for the records pushed so far.
    pub(crate) fn target(&self) -> FlushTarget {
        self.parts
            .iter()
            .filter_map(|(tp, p)| p.last_pushed.map(|l| (tp.clone(), l)))
            .collect()
    }

    /// Where a flush with `target` stands. Partitions revoked since are ignored.
    pub(crate) fn status(&self, target: &FlushTarget) -> FlushStatus {
        let mut pending = false;
        for (tp, &last) in target {
            let Some(p) = self.parts.get(tp) else {
                continue;
            };
            if p.position.is_some_and(|pos| pos > last) {
                continue;
            }
            match p.entries.front() {
                Some(Entry {
                    offset,
                    state: State::Failed(reason),
                    ..
                }) if *offset <= last => {
                    let coords = RecordCoords {
                        tp: tp.clone(),
                        offset: *offset,
                    };
                    return FlushStatus::Failed(coords, reason.clone());
                }
                // A partition rewound after the target was taken: nothing of the target
                // is pending there any more.
                None => continue,
                Some(e) if e.offset > last => continue,
                Some(_) => pending = true,
            }
        }
        if pending {
            FlushStatus::Pending
        } else {
            FlushStatus::Complete
        }
    }

    /// How many records up to `target` are unresolved.
    pub(crate) fn unresolved(&self, target: &FlushTarget) -> usize {
        target
            .iter()
            .filter_map(|(tp, &last)| self.parts.get(tp).map(|p| (p, last)))
            .map(|(p, last)| {
                p.entries
                    .iter()
                    .take_while(|e| e.offset <= last)
                    .filter(|e| e.state != State::Done)
                    .count()
            })
            .sum()
    }

    /// Forgets every push and returns, per partition, the offset to seek to: the last
    /// committed position, or the first offset pushed if nothing was committed.
    pub(crate) fn rewind(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.parts {
            let to = p.committed.or(p.first_pushed).or(p.position);
            p.entries.clear();
            p.last_pushed = None;
            p.first_pushed = to;
            p.position = to;
            if let Some(to) = to {
                out.push((tp.clone(), to));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("t", 0)
    }

    #[test]
    fn position_waits_for_the_lowest_unacked() {
        let mut l = Ledger::default();
        for (i, off) in [10, 11, 13].into_iter().enumerate() {
            l.check_order(&tp(), off).expect("in order");
            l.push(&tp(), off, i as u64);
        }
        assert_eq!(l.positions(), vec![], "nothing resolved, nothing to commit");
        assert!(l.resolve(&tp(), 13, 2));
        assert!(l.resolve(&tp(), 11, 1));
        assert_eq!(l.positions(), vec![]);
        let target = l.target();
        assert_eq!(l.status(&target), FlushStatus::Pending);
        assert_eq!(l.unresolved(&target), 1);
        assert!(l.resolve(&tp(), 10, 0));
        assert_eq!(l.positions(), vec![(tp(), 14)]);
        assert_eq!(l.status(&target), FlushStatus::Complete);
    }

    #[test]
    fn a_failed_record_holds_the_position_and_fails_the_flush() {
        let mut l = Ledger::default();
        l.push(&tp(), 0, 0);
        l.push(&tp(), 1, 1);
        l.push(&tp(), 2, 2);
        assert!(l.resolve(&tp(), 0, 0));
        assert!(l.fail(&tp(), 1, 1, RejectReason::MissingKey));
        assert!(l.resolve(&tp(), 2, 2));
        assert_eq!(l.positions(), vec![(tp(), 1)]);
        let coords = RecordCoords {
            tp: tp(),
            offset: 1,
        };
        assert_eq!(
            l.status(&l.target()),
            FlushStatus::Failed(coords, RejectReason::MissingKey)
        );
    }

    #[test]
    fn positions_never_move_backwards() {
        let mut l = Ledger::default();
        l.assign(tp(), Some(10));
        l.push(&tp(), 3, 0);
        assert!(l.resolve(&tp(), 3, 0));
        assert_eq!(l.positions(), vec![(tp(), 10)]);
    }

    #[test]
    fn rewind_goes_to_committed_and_ignores_stale_acks() {
        let mut l = Ledger::default();
        l.assign(tp(), Some(5));
        l.push(&tp(), 5, 0);
        l.push(&tp(), 6, 1);
        assert!(l.resolve(&tp(), 5, 0));
        l.committed(&tp(), 6);
        l.push(&tp(), 7, 2);
        assert_eq!(l.rewind(), vec![(tp(), 6)]);
        // The old push of offset 6 is acknowledged late: it must not count.
        assert!(!l.resolve(&tp(), 6, 1));
        l.check_order(&tp(), 6)
            .expect("replay from the rewind point");
        l.push(&tp(), 6, 3);
        assert!(l.resolve(&tp(), 6, 3));
        assert_eq!(l.positions(), vec![(tp(), 7)]);
        assert_eq!(l.check_order(&tp(), 6), Err(OutOfOrder { last: 6 }));
    }
}
