//! [`BridgeFlow`]: the Kafka half of a bridge, sans-IO. It decides which consumed records
//! go to the sink now, which wait and which are dropped (revoked, rewound, or read from a
//! position a failed seek left behind); it schedules checkpoints, chooses what to commit and
//! where to seek, pauses and resumes partitions, and runs the revoke and stop sequences. A
//! runtime reports facts (records polled, partitions assigned or revoked, results of what
//! it was asked) and executes the [`BridgeAction`]s it polls; it decides nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::checkpoint::Checkpoints;
use crate::event::{CommitOffsets, PushRefusal, SinkError};
use crate::kafka_config::KafkaConfig;
use crate::record::{Record, TopicPartition};

/// How long the sink must stay full before the bridge pauses its partitions. Shorter
/// stalls (routine backpressure: the buffer drains a quarter and takes the next batch) pass
/// without a pause, because each pause makes librdkafka drop what it prefetched and fetch it
/// again after the resume (QoS 1, 1M records: 4.2 vs 3.0 us of CPU per record).
pub const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Records consumed but not yet taken by the sink are held up to this many (the consumer
/// is not polled for more until they drain) ...
pub const HELD_MAX_RECORDS: usize = 1024;
/// ... and up to this many bytes of keys, values and headers (one record may exceed it).
pub const HELD_MAX_BYTES: usize = 4 << 20;

/// A per-record transform: `None` drops the record (its offset passes).
pub type Transform = Box<dyn FnMut(Record) -> Option<Record> + Send>;

/// What the runtime must do next. Actions that say "report" must be reported (with the
/// named `handle_*`) before the next [`BridgeFlow::poll_action`]: until then it returns
/// `None`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
#[must_use]
pub enum BridgeAction {
    /// Consumer: pause these partitions.
    Pause(Vec<TopicPartition>),
    /// Consumer: resume these partitions.
    Resume(Vec<TopicPartition>),
    /// Consumer: seek this partition to `offset`; report with
    /// [`handle_seek_result`](BridgeFlow::handle_seek_result).
    Seek {
        /// The partition.
        tp: TopicPartition,
        /// The offset to consume next.
        offset: i64,
    },
    /// Consumer: commit exactly these positions, synchronously; report with
    /// [`handle_commit_result`](BridgeFlow::handle_commit_result).
    Commit(CommitOffsets),
    /// Sink: push these records in order (`Sink::push_batch`); report what was not taken
    /// with [`handle_pushed`](BridgeFlow::handle_pushed).
    Push(VecDeque<Record>),
    /// Sink: flush; report with [`handle_flushed`](BridgeFlow::handle_flushed).
    Flush,
    /// Sink: `assign` these partitions with their committed positions.
    AssignSink(Vec<(TopicPartition, Option<i64>)>),
    /// Sink: `revoke` these partitions.
    RevokeSink(Vec<TopicPartition>),
    /// Sink: `rewind` (forget every record not committed). The flow seeks the consumer.
    RewindSink,
    /// Sink: `handle_committed` (Kafka confirmed these positions).
    CommittedSink(CommitOffsets),
    /// Sink: report its commit positions (`Sink::commit_positions`: every record below
    /// each is acknowledged or handled) with [`ActionReport::Positions`]; no flush.
    Positions,
}

/// The result of an executed action, for [`BridgeFlow::handle_report`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ActionReport {
    /// [`BridgeAction::Push`]: the records not taken (the first is the refused one) and why.
    Pushed(VecDeque<Record>, Option<PushRefusal>),
    /// [`BridgeAction::Flush`].
    Flushed(FlushOutcome),
    /// [`BridgeAction::Commit`]: the positions and Kafka's answer.
    Committed(CommitOffsets, Result<(), String>),
    /// [`BridgeAction::Seek`]: the partition, the offset and the consumer's answer.
    Sought(TopicPartition, i64, Result<(), String>),
    /// [`BridgeAction::Positions`]: the sink's commit positions.
    Positions(CommitOffsets),
    /// An action that reports nothing (pause, resume, the sink's assign, revoke, rewind
    /// and committed).
    Done,
}

/// How a flush ended, as the bridge saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Every record was acknowledged or handled.
    pub complete: bool,
    /// Incomplete only because the deadline passed: the unacknowledged records are still in
    /// the sink and will be published (nothing was refused).
    pub timed_out: bool,
    /// Positions safe to commit (all of them when complete).
    pub offsets: CommitOffsets,
}

impl FlushOutcome {
    /// How a runtime's flush call ended, as the flow needs it.
    pub fn from_flush(r: Result<CommitOffsets, SinkError>) -> Self {
        let (complete, timed_out, offsets) = match r {
            Ok(offsets) => (true, false, offsets),
            Err(SinkError::FlushTimedOut { offsets, .. }) => (false, true, offsets),
            Err(SinkError::FlushFailed { offsets, .. }) => (false, false, offsets),
            Err(_) => (false, false, Vec::new()),
        };
        Self {
            complete,
            timed_out,
            offsets,
        }
    }
}

/// What a bridge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Records consumed from Kafka.
    pub consumed: u64,
    /// Records dropped by the transform.
    pub filtered: u64,
    /// Consumed records dropped unsent because their partition was revoked or rewound, or
    /// read from a position a failed seek left behind: they are not committed and will be
    /// consumed again (here or by the partition's new owner).
    pub dropped: u64,
    /// Commits Kafka accepted (checkpoints' and those between them, see
    /// `KafkaConfig::commit_min_interval`).
    pub commits: u64,
    /// Commits Kafka refused (the next checkpoint commits again; nothing is lost).
    pub commit_errors: u64,
    /// The last refusal.
    pub last_commit_error: Option<String>,
    /// Checkpoints that failed and rewound.
    pub rewinds: u64,
    /// Seeks that failed (retried with a backoff; the partition's records are dropped
    /// meanwhile).
    pub seek_errors: u64,
    /// Consumer errors (librdkafka retries them).
    pub kafka_errors: u64,
    /// The last consumer or seek error.
    pub last_kafka_error: Option<String>,
    /// The highest positions committed, per partition this instance owns, in topic and
    /// partition order.
    pub committed: CommitOffsets,
    /// How long the last checkpoint's flush took, in milliseconds.
    pub last_flush_ms: u64,
    /// Partitions Kafka has assigned to this instance.
    pub assigned: usize,
    /// Assignments received from the group, an empty one included.
    pub assignments: u64,
    /// A member of the consumer group now (joined and steady, with or without partitions),
    /// as the Kafka client last reported.
    pub member: bool,
}

/// A seek the flow waits on.
#[derive(Debug, Clone, Copy)]
enum Seek {
    /// Asked, not yet reported.
    Asked,
    /// Failed: asked again at `retry`; records of the partition are dropped until then.
    Failed { to: i64, retry: Instant },
}

#[derive(Debug)]
struct Part {
    /// The committed position known: from the assignment, or a commit Kafka confirmed.
    committed: Option<i64>,
    /// Where the consumer started delivering since the assignment or the last seek (the
    /// seek target, or the first offset it delivered).
    start: Option<i64>,
    /// A record was delivered since the assignment or the last seek: the consumer moved.
    moved: bool,
    seek: Option<Seek>,
    seek_backoff: Backoff,
}

impl Part {
    fn new(committed: Option<i64>) -> Self {
        Self {
            committed,
            start: committed,
            moved: false,
            seek: None,
            seek_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 0),
        }
    }
}

/// What the flow is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Consuming.
    Running,
    /// A checkpoint's flush, then its commit (and a rewind if it failed).
    Checkpoint { rewind: bool },
    /// Revoking these partitions: flush, commit them, revoke them in the sink.
    Revoking(Vec<TopicPartition>),
    /// Stopping: flush, commit, then stopped.
    Stopping,
    /// Stopped: nothing more to do.
    Stopped,
}

/// The report an action awaits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Awaiting {
    Pushed(usize),
    Flushed,
    Committed,
    Seek(TopicPartition),
    Positions,
}

/// A step queued: built into an action when polled, so it sees the state of that moment.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Act(BridgeAction),
    /// Commit this flush's positions, limited to `only` (or to every owned partition).
    CommitFlushed(CommitOffsets, Option<Vec<TopicPartition>>),
    /// Drop what is held, rewind the sink, seek every partition that moved.
    Rewind,
    /// The revoke's last step: revoke in the sink, forget the partitions.
    FinishRevoke,
    /// The stop's last step.
    FinishStop,
}

/// The Kafka half of a bridge, sans-IO.
///
/// A runtime's consumer loop feeds it facts and executes its actions:
///
/// * facts: [`handle_assigned`](Self::handle_assigned) and
///   [`handle_revoked`](Self::handle_revoked) (from the rebalance callbacks),
///   [`handle_records`](Self::handle_records) (what the consumer delivered, untransformed),
///   [`handle_room`](Self::handle_room) (the sink has room again),
///   [`handle_kafka_error`](Self::handle_kafka_error), and the reports of actions:
///   [`handle_pushed`](Self::handle_pushed), [`handle_flushed`](Self::handle_flushed),
///   [`handle_commit_result`](Self::handle_commit_result),
///   [`handle_seek_result`](Self::handle_seek_result);
/// * commands: [`stop`](Self::stop);
/// * outputs: [`poll_action`](Self::poll_action) until `None`, executing each (and
///   reporting it, where the action says so) before polling the next; then
///   [`may_poll_consumer`](Self::may_poll_consumer),
///   [`waits_for_room`](Self::waits_for_room) and [`poll_timeout`](Self::poll_timeout) say
///   what to wait for. After a rebalance callback's fact, drain the actions inside the
///   callback: the revoke's flush and commit complete before the partitions go.
///
/// Guarantees: a commit position it asks for is one the sink reported for a partition
/// this member owns; a record of a partition revoked or rewound is never pushed after the
/// revoke or rewind; after a rewind every partition the consumer moved on is sought back
/// to its committed position (or where it started since the assignment) before any of its
/// records is pushed again, and a failed seek is retried, never skipped.
pub struct BridgeFlow {
    checkpoints: Checkpoints,
    transform: Option<Transform>,
    parts: BTreeMap<TopicPartition, Part>,
    held: VecDeque<Record>,
    held_bytes: usize,
    /// The sink refused a push as full and has not reported room since.
    sink_full: bool,
    /// Since when records wait for a full sink.
    holding: Option<Instant>,
    /// Partitions paused because the sink stayed full. Pauses survive rebalances in
    /// librdkafka, so this set, not the client, is the truth.
    paused: BTreeSet<TopicPartition>,
    phase: Phase,
    steps: VecDeque<Step>,
    awaiting: Option<Awaiting>,
    flush_started: Option<Instant>,
    /// Between checkpoints, commit what the sink acknowledged at most this often (zero:
    /// never), next at `next_positions`.
    commit_min_interval: Duration,
    next_positions: Instant,
    /// When the commit of [`handle_positions`](Self::handle_positions) was asked for.
    positions_commit: Option<Instant>,
    /// The sink refused for good (closed): the bridge must stop with this error.
    fatal: Option<String>,
    stats: BridgeStats,
}

impl std::fmt::Debug for BridgeFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeFlow")
            .field("phase", &self.phase)
            .field("held", &self.held.len())
            .field("awaiting", &self.awaiting)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl BridgeFlow {
    /// A flow on `kafka`'s checkpoint schedule, starting at `now`.
    pub fn new(kafka: &KafkaConfig, now: Instant) -> Self {
        Self {
            checkpoints: Checkpoints::new(kafka.commit_interval, kafka.commit_every, now),
            transform: None,
            parts: BTreeMap::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            sink_full: false,
            holding: None,
            paused: BTreeSet::new(),
            phase: Phase::Running,
            steps: VecDeque::new(),
            awaiting: None,
            flush_started: None,
            commit_min_interval: kafka.commit_min_interval,
            next_positions: now + kafka.commit_min_interval,
            positions_commit: None,
            fatal: None,
            stats: BridgeStats::default(),
        }
    }

    /// Applies `f` to every consumed record before it is held (`None` drops it; its
    /// offset passes).
    pub fn set_transform(&mut self, f: Transform) {
        self.transform = Some(f);
    }

    /// What the bridge did.
    pub fn stats(&self) -> &BridgeStats {
        &self.stats
    }

    /// The partitions assigned now.
    pub fn assigned(&self) -> Vec<TopicPartition> {
        self.parts.keys().cloned().collect()
    }

    /// Records held for the sink.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// True once the stop sequence finished.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// The sink refused for good: stop the bridge with this error.
    pub fn fatal_error(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// True while a revoke's flush and commit are under way (a rebalance callback drains
    /// actions until it is false).
    pub fn is_revoking(&self) -> bool {
        matches!(self.phase, Phase::Revoking(_))
    }

    // ---- facts ----

    /// Kafka assigned these partitions, with their committed positions where known (the
    /// rewind floor). A partition paused before comes back paused in librdkafka: the flow
    /// resumes it, or pauses it with the others while the sink stays full.
    pub fn handle_assigned(&mut self, parts: Vec<(TopicPartition, Option<i64>)>) {
        let tps: Vec<_> = parts.iter().map(|(tp, _)| tp.clone()).collect();
        for (tp, committed) in &parts {
            self.parts.insert(tp.clone(), Part::new(*committed));
        }
        self.stats.assigned = self.parts.len();
        self.stats.assignments += 1;
        self.steps
            .push_back(Step::Act(BridgeAction::AssignSink(parts)));
        if self.paused.is_empty() {
            self.steps.push_back(Step::Act(BridgeAction::Resume(tps)));
        } else {
            self.paused.extend(tps.iter().cloned());
            self.steps.push_back(Step::Act(BridgeAction::Pause(tps)));
        }
    }

    /// The Kafka client reports whether the consumer is a member of its group now.
    pub fn handle_group_state(&mut self, member: bool) {
        self.stats.member = member;
    }

    /// Kafka is revoking these partitions: their held records are dropped now; the flow
    /// flushes the sink, commits the positions of these partitions, and revokes them in the
    /// sink. Drain the actions before the callback returns.
    pub fn handle_revoked(&mut self, now: Instant, revoked: Vec<TopicPartition>) {
        let revoked: Vec<_> = revoked
            .into_iter()
            .filter(|tp| self.parts.contains_key(tp))
            .collect();
        self.drop_held(|tp| revoked.contains(tp));
        for tp in &revoked {
            self.paused.remove(tp);
        }
        if revoked.is_empty() {
            return;
        }
        if matches!(self.phase, Phase::Stopping | Phase::Stopped) {
            // The stop's own flush and commit cover them (a consumer closing after the
            // stop revokes everything): forget them, nothing more to send.
            for tp in &revoked {
                self.parts.remove(tp);
            }
            self.stats.assigned = self.parts.len();
            return;
        }
        if self.held.is_empty() {
            // Nothing waits for the sink any more: no pause is due (its deadline would stay
            // in the past: a runtime would spin), and what is paused resumes (no push will).
            self.holding = None;
            if !self.paused.is_empty() {
                let paused: Vec<_> = std::mem::take(&mut self.paused).into_iter().collect();
                self.steps
                    .push_back(Step::Act(BridgeAction::Resume(paused)));
            }
        }
        self.flush_started = Some(now);
        self.phase = Phase::Revoking(revoked);
        self.steps.push_back(Step::Act(BridgeAction::Flush));
    }

    /// The consumer delivered these records (in its order, untransformed).
    pub fn handle_records(&mut self, now: Instant, records: impl IntoIterator<Item = Record>) {
        for r in records {
            self.stats.consumed += 1;
            let take = match self.parts.get_mut(&r.tp) {
                // Not ours (revoked) or read from where a seek has not yet taken us.
                None => false,
                Some(p) if p.seek.is_some() => false,
                Some(_) if matches!(self.phase, Phase::Revoking(ref v) if v.contains(&r.tp)) => {
                    false
                }
                Some(p) => {
                    p.start.get_or_insert(r.offset);
                    p.moved = true;
                    true
                }
            };
            if !take || matches!(self.phase, Phase::Stopping | Phase::Stopped) {
                self.stats.dropped += 1;
                continue;
            }
            let kept = match self.transform.as_mut() {
                Some(t) => t(r),
                None => Some(r),
            };
            match kept {
                Some(r) => {
                    self.held_bytes += r.size();
                    self.held.push_back(r);
                }
                None => self.stats.filtered += 1,
            }
        }
        if self.sink_full {
            self.holding.get_or_insert(now);
        }
    }

    /// The sink has room again (after a push it refused as full).
    pub fn handle_room(&mut self) {
        self.sink_full = false;
    }

    /// A consumer error (the client retries it).
    pub fn handle_kafka_error(&mut self, e: String) {
        self.stats.kafka_errors += 1;
        self.stats.last_kafka_error = Some(e);
    }

    /// The report of any action (the runtime's one entry for them).
    pub fn handle_report(&mut self, now: Instant, report: ActionReport) {
        match report {
            ActionReport::Pushed(rest, why) => self.handle_pushed(now, rest, why),
            ActionReport::Flushed(outcome) => self.handle_flushed(now, outcome),
            ActionReport::Committed(offsets, result) => {
                if let Some(asked) = self.positions_commit.take() {
                    // The commit blocks the consumer loop: where Kafka answers slowly,
                    // commits between checkpoints take at most a tenth of its time.
                    let took = now.saturating_duration_since(asked);
                    self.next_positions = self.next_positions.max(now + took * 9);
                }
                self.handle_commit_result(&offsets, result)
            }
            ActionReport::Sought(tp, offset, result) => {
                self.handle_seek_result(now, &tp, offset, result)
            }
            ActionReport::Positions(offsets) => self.handle_positions(now, offsets),
            // A sink that closed answers nothing: no positions, nothing to commit (the
            // next push or flush reports it closed).
            ActionReport::Done if self.awaiting == Some(Awaiting::Positions) => {
                self.handle_positions(now, Vec::new())
            }
            ActionReport::Done => {}
        }
    }

    /// The report of [`BridgeAction::Push`]: the records the sink did not take (the first
    /// is the one refused) and why.
    pub fn handle_pushed(
        &mut self,
        now: Instant,
        mut rest: VecDeque<Record>,
        refusal: Option<PushRefusal>,
    ) {
        let Some(Awaiting::Pushed(sent)) = self.awaiting.take() else {
            return;
        };
        self.checkpoints
            .records_pushed(sent.saturating_sub(rest.len()) as u64);
        match refusal {
            None | Some(PushRefusal::Full) if rest.is_empty() => {}
            Some(PushRefusal::Full) => {
                self.sink_full = true;
                self.holding.get_or_insert(now);
            }
            // Its partition is no longer the sink's: not ours to push.
            Some(PushRefusal::NotAssigned) => {
                let tp = rest[0].tp.clone();
                let before = rest.len();
                rest.retain(|r| r.tp != tp);
                self.stats.dropped += (before - rest.len()) as u64;
                self.parts.remove(&tp);
            }
            // Already pushed once (the sink tracks that copy): a duplicate delivery.
            Some(PushRefusal::OutOfOrder { .. }) => {
                rest.pop_front();
                self.stats.dropped += 1;
            }
            Some(PushRefusal::Closed) => {
                self.fatal = Some("the MQTT sink closed".into());
            }
            None => {}
        }
        // Records consumed while the push ran go behind the ones it returned.
        rest.append(&mut self.held);
        self.held = rest;
        self.held_bytes = self.held.iter().map(Record::size).sum();
        if !self.sink_full {
            self.holding = None;
        }
        if self.held.is_empty() && !self.paused.is_empty() {
            let paused: Vec<_> = std::mem::take(&mut self.paused).into_iter().collect();
            self.steps
                .push_back(Step::Act(BridgeAction::Resume(paused)));
        }
    }

    /// The report of [`BridgeAction::Flush`].
    pub fn handle_flushed(&mut self, now: Instant, outcome: FlushOutcome) {
        if self.awaiting != Some(Awaiting::Flushed) {
            return;
        }
        self.awaiting = None;
        if let Some(t) = self.flush_started.take() {
            self.stats.last_flush_ms = now.saturating_duration_since(t).as_millis() as u64;
        }
        match self.phase.clone() {
            Phase::Checkpoint { .. } => {
                let failed = !outcome.complete && !outcome.timed_out;
                self.steps
                    .push_back(Step::CommitFlushed(outcome.offsets, None));
                if failed {
                    // Refused under the `fail` policy (or the sink closed): commit what is
                    // safe, rewind to the committed positions, back off.
                    self.stats.rewinds += 1;
                    self.steps.push_back(Step::Rewind);
                    self.checkpoints.failed(now);
                } else {
                    // A timeout leaves the unacknowledged records in the sink: they go out
                    // as the broker allows (a rewind would publish them twice).
                    self.checkpoints.completed(now);
                }
                self.phase = Phase::Checkpoint { rewind: failed };
            }
            Phase::Revoking(tps) => {
                self.steps
                    .push_back(Step::CommitFlushed(outcome.offsets, Some(tps)));
                self.steps.push_back(Step::FinishRevoke);
            }
            Phase::Stopping => {
                self.steps
                    .push_back(Step::CommitFlushed(outcome.offsets, None));
                self.steps.push_back(Step::FinishStop);
            }
            Phase::Running | Phase::Stopped => {}
        }
    }

    /// The report of [`BridgeAction::Commit`] (`Err`: Kafka's refusal).
    pub fn handle_commit_result(&mut self, offsets: &CommitOffsets, result: Result<(), String>) {
        if self.awaiting != Some(Awaiting::Committed) {
            return;
        }
        self.awaiting = None;
        match result {
            Ok(()) => {
                self.stats.commits += 1;
                for (tp, off) in offsets {
                    if let Some(p) = self.parts.get_mut(tp) {
                        p.committed = Some(p.committed.map_or(*off, |c| c.max(*off)));
                    }
                    // Kept in topic/partition order, whichever partition committed first.
                    match self.stats.committed.binary_search_by(|(t, _)| t.cmp(tp)) {
                        Ok(i) => {
                            let o = &mut self.stats.committed[i].1;
                            *o = (*o).max(*off);
                        }
                        Err(i) => self.stats.committed.insert(i, (tp.clone(), *off)),
                    }
                }
                self.steps
                    .push_front(Step::Act(BridgeAction::CommittedSink(offsets.clone())));
            }
            Err(e) => {
                self.stats.commit_errors += 1;
                self.stats.last_commit_error = Some(e);
            }
        }
    }

    /// The report of [`BridgeAction::Positions`]: commits, between checkpoints, the
    /// positions that moved past what is committed, of partitions this member owns and has
    /// not sent back by a seek. The commit is synchronous, in the consumer loop: one that
    /// takes `d` puts the next at least `9 d` later (at most a tenth of the loop's time).
    pub fn handle_positions(&mut self, now: Instant, offsets: CommitOffsets) {
        if self.awaiting != Some(Awaiting::Positions) {
            return;
        }
        self.awaiting = None;
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let moved: CommitOffsets = offsets
            .into_iter()
            .filter(|(tp, pos)| {
                self.parts
                    .get(tp)
                    .is_some_and(|p| p.seek.is_none() && p.committed.is_none_or(|c| *pos > c))
            })
            .collect();
        if !moved.is_empty() {
            self.positions_commit = Some(now);
            self.steps
                .push_front(Step::Act(BridgeAction::Commit(moved)));
        }
    }

    /// The report of [`BridgeAction::Seek`]. A failed seek is asked again after a backoff;
    /// until one succeeds, the partition's records are dropped (they come from the wrong
    /// position) and its commit position stays at the rewind point.
    pub fn handle_seek_result(
        &mut self,
        now: Instant,
        tp: &TopicPartition,
        offset: i64,
        result: Result<(), String>,
    ) {
        if self.awaiting.as_ref() != Some(&Awaiting::Seek(tp.clone())) {
            return;
        }
        self.awaiting = None;
        let Some(p) = self.parts.get_mut(tp) else {
            return;
        };
        match result {
            Ok(()) => {
                p.seek = None;
                p.seek_backoff.reset();
            }
            Err(e) => {
                self.stats.seek_errors += 1;
                self.stats.last_kafka_error = Some(format!("seek {tp} to {offset}: {e}"));
                let retry = now + p.seek_backoff.next_delay();
                p.seek = Some(Seek::Failed { to: offset, retry });
            }
        }
    }

    /// Begins the graceful stop: held records are dropped (uncommitted, they will be read
    /// again), the sink is flushed (bounded by its flush timeout), what is safe is
    /// committed, then [`is_stopped`](Self::is_stopped).
    pub fn stop(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping | Phase::Stopped) {
            return;
        }
        self.drop_held(|_| true);
        self.steps
            .retain(|s| matches!(s, Step::Act(BridgeAction::CommittedSink(_))));
        self.flush_started = Some(now);
        self.phase = Phase::Stopping;
        self.steps.push_back(Step::Act(BridgeAction::Flush));
    }

    // ---- outputs ----

    /// The next action, if any (`None` also while an action awaits its report).
    pub fn poll_action(&mut self, now: Instant) -> Option<BridgeAction> {
        if self.awaiting.is_some() {
            return None;
        }
        loop {
            let step = match self.steps.pop_front() {
                Some(s) => s,
                None => self.next_step(now)?,
            };
            if let Some(a) = self.build(step) {
                self.awaiting = match &a {
                    BridgeAction::Push(r) => Some(Awaiting::Pushed(r.len())),
                    BridgeAction::Flush => Some(Awaiting::Flushed),
                    BridgeAction::Commit(_) => Some(Awaiting::Committed),
                    BridgeAction::Seek { tp, .. } => Some(Awaiting::Seek(tp.clone())),
                    BridgeAction::Positions => Some(Awaiting::Positions),
                    _ => None,
                };
                return Some(a);
            }
        }
    }

    /// True when the runtime may poll its consumer now: there is room to hold what it
    /// delivers, or the partitions are paused (the poll then serves the group's callbacks
    /// and delivers nothing). False while backing off after a failed checkpoint, while an
    /// action awaits its report, and once stopping.
    pub fn may_poll_consumer(&self, now: Instant) -> bool {
        self.awaiting.is_none()
            && self.steps.is_empty()
            && matches!(self.phase, Phase::Running)
            && self.checkpoints.may_consume(now)
            && (!self.paused.is_empty() || self.has_room())
    }

    /// How many more records the consumer may deliver before the flow is full.
    pub fn room(&self) -> usize {
        if self.held_bytes >= HELD_MAX_BYTES {
            return 0;
        }
        HELD_MAX_RECORDS.saturating_sub(self.held.len())
    }

    fn has_room(&self) -> bool {
        self.room() > 0
    }

    /// True while records wait for the sink to have room: report it with
    /// [`handle_room`](Self::handle_room).
    pub fn waits_for_room(&self) -> bool {
        self.sink_full && !self.held.is_empty()
    }

    /// When to call [`poll_action`](Self::poll_action) again at the latest, if nothing
    /// happens before (a checkpoint, the end of a backoff, a pause, a seek retry).
    pub fn poll_timeout(&self) -> Instant {
        let mut next = self.checkpoints.next_deadline();
        // A pause is due only while records wait and there is something to pause.
        let pausable = self.paused.is_empty() && !self.parts.is_empty() && !self.held.is_empty();
        if let Some(since) = self.holding.filter(|_| pausable) {
            next = next.min(since + PAUSE_AFTER);
        }
        for p in self.parts.values() {
            if let Some(Seek::Failed { retry, .. }) = p.seek {
                next = next.min(retry);
            }
        }
        if self.positions_wanted() {
            next = next.min(self.next_positions);
        }
        next
    }

    /// Commits between checkpoints are on, and there is something this member could
    /// commit (see [`handle_positions`](Self::handle_positions)).
    fn positions_wanted(&self) -> bool {
        !self.commit_min_interval.is_zero()
            && self.fatal.is_none()
            && matches!(self.phase, Phase::Running | Phase::Checkpoint { .. })
            && !self.parts.is_empty()
    }

    // ---- internals ----

    /// What to do when nothing is queued.
    fn next_step(&mut self, now: Instant) -> Option<Step> {
        self.checkpoints.resume_if_due(now);
        if self.fatal.is_some() {
            return None;
        }
        let running = matches!(self.phase, Phase::Running | Phase::Checkpoint { .. });
        if !running {
            return None;
        }
        self.phase = Phase::Running;
        if let Some((tp, to)) = self.parts.iter().find_map(|(tp, p)| match p.seek {
            Some(Seek::Failed { to, retry }) if now >= retry => Some((tp.clone(), to)),
            _ => None,
        }) {
            if let Some(p) = self.parts.get_mut(&tp) {
                p.seek = Some(Seek::Asked);
            }
            return Some(Step::Act(BridgeAction::Seek { tp, offset: to }));
        }
        if self.checkpoints.is_due(now) {
            self.flush_started = Some(now);
            self.phase = Phase::Checkpoint { rewind: false };
            return Some(Step::Act(BridgeAction::Flush));
        }
        if self.positions_wanted() && now >= self.next_positions {
            // At most once per interval, however late (a flow polled rarely does not catch
            // up with a burst of commits).
            self.next_positions = now + self.commit_min_interval;
            return Some(Step::Act(BridgeAction::Positions));
        }
        if let Some(since) = self.holding {
            let unpaused: Vec<_> = self
                .parts
                .keys()
                .filter(|tp| !self.paused.contains(*tp))
                .cloned()
                .collect();
            let waiting = !self.held.is_empty();
            if waiting
                && now >= since + PAUSE_AFTER
                && self.paused.is_empty()
                && !unpaused.is_empty()
            {
                self.paused.extend(unpaused.iter().cloned());
                return Some(Step::Act(BridgeAction::Pause(unpaused)));
            }
        }
        if !self.held.is_empty() && !self.sink_full && self.checkpoints.may_consume(now) {
            // `commit_every` counts records: push no more than make the checkpoint due.
            let take = match self.checkpoints.records_until_due() {
                Some(n) => (n.max(1) as usize).min(self.held.len()),
                None => self.held.len(),
            };
            let rest = self.held.split_off(take);
            let records = std::mem::replace(&mut self.held, rest);
            self.held_bytes = self.held.iter().map(Record::size).sum();
            return Some(Step::Act(BridgeAction::Push(records)));
        }
        None
    }

    /// Turns a step into its action (`None`: nothing to do for it).
    fn build(&mut self, step: Step) -> Option<BridgeAction> {
        match step {
            Step::Act(a) => Some(a),
            Step::CommitFlushed(offsets, only) => {
                // Never a position for a partition this member does not own (or is
                // handing over, outside of that hand-over's own commit).
                let mine: CommitOffsets = offsets
                    .into_iter()
                    .filter(|(tp, _)| self.parts.contains_key(tp))
                    .filter(|(tp, _)| only.as_ref().is_none_or(|o| o.contains(tp)))
                    .collect();
                (!mine.is_empty()).then_some(BridgeAction::Commit(mine))
            }
            Step::Rewind => {
                self.drop_held(|_| true);
                self.sink_full = false;
                self.holding = None;
                let mut seeks = Vec::new();
                for (tp, p) in &mut self.parts {
                    // The consumer moved since it was last put somewhere known: back to
                    // the committed position, or where it started since the assignment.
                    let Some(to) = p.committed.or(p.start).filter(|_| p.moved) else {
                        continue;
                    };
                    p.start = Some(to);
                    p.moved = false;
                    p.seek = Some(Seek::Asked);
                    seeks.push((tp.clone(), to));
                }
                let mut front = vec![Step::Act(BridgeAction::RewindSink)];
                if !self.paused.is_empty() {
                    let paused: Vec<_> = std::mem::take(&mut self.paused).into_iter().collect();
                    front.push(Step::Act(BridgeAction::Resume(paused)));
                }
                for (tp, to) in seeks {
                    front.push(Step::Act(BridgeAction::Seek { tp, offset: to }));
                }
                for s in front.into_iter().rev() {
                    self.steps.push_front(s);
                }
                None
            }
            Step::FinishRevoke => {
                let Phase::Revoking(tps) = std::mem::replace(&mut self.phase, Phase::Running)
                else {
                    return None;
                };
                for tp in &tps {
                    self.parts.remove(tp);
                    self.stats.committed.retain(|(t, _)| t != tp);
                }
                self.stats.assigned = self.parts.len();
                Some(BridgeAction::RevokeSink(tps))
            }
            Step::FinishStop => {
                self.phase = Phase::Stopped;
                None
            }
        }
    }

    fn drop_held(&mut self, which: impl Fn(&TopicPartition) -> bool) {
        let before = self.held.len();
        self.held.retain(|r| !which(&r.tp));
        self.stats.dropped += (before - self.held.len()) as u64;
        self.held_bytes = self.held.iter().map(Record::size).sum();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // the test plays the runtime
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    fn rec(p: i32, off: i64) -> Record {
        Record::new(tp(p), off, Some("k"), Some("v"))
    }

    fn flow(now: Instant) -> BridgeFlow {
        let mut k = KafkaConfig::new("b", "g", vec!["t".into()]);
        k.commit_interval = Duration::from_secs(5);
        // Commits between checkpoints have tests of their own.
        k.commit_min_interval = Duration::ZERO;
        BridgeFlow::new(&k, now)
    }

    /// Polls every action, answering with `answer` (`None`: `Done`).
    fn run(
        f: &mut BridgeFlow,
        now: Instant,
        mut answer: impl FnMut(&BridgeAction) -> Option<ActionReport>,
    ) -> Vec<BridgeAction> {
        let mut out = Vec::new();
        for _ in 0..100 {
            let Some(a) = f.poll_action(now) else {
                return out;
            };
            let r = answer(&a).unwrap_or(ActionReport::Done);
            out.push(a);
            f.handle_report(now, r);
        }
        panic!("more than 100 actions: {out:?}");
    }

    fn sink_takes_all(a: &BridgeAction) -> Option<ActionReport> {
        match a {
            BridgeAction::Push(_) => Some(ActionReport::Pushed(VecDeque::new(), None)),
            _ => None,
        }
    }

    fn sink_full(a: &BridgeAction) -> Option<ActionReport> {
        match a {
            BridgeAction::Push(r) => Some(ActionReport::Pushed(r.clone(), Some(PushRefusal::Full))),
            _ => None,
        }
    }

    #[test]
    fn c1_records_held_for_a_revoked_partition_are_never_pushed() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), Some(150))]);
        run(&mut f, now, sink_takes_all);
        // The sink is full: 150..199 are held.
        f.handle_records(now, (150..200).map(|o| rec(0, o)));
        run(&mut f, now, sink_full);
        assert_eq!(f.held(), 50);
        // An eager rebalance revokes and gives the partition back.
        f.handle_revoked(now, vec![tp(0)]);
        assert_eq!(
            f.held(),
            0,
            "held records of a revoked partition are dropped"
        );
        let acts =
            run(&mut f, now, |a| match a {
                BridgeAction::Flush => Some(ActionReport::Flushed(FlushOutcome::from_flush(Ok(
                    vec![(tp(0), 150)],
                )))),
                BridgeAction::Commit(o) => Some(ActionReport::Committed(o.clone(), Ok(()))),
                _ => None,
            });
        assert!(
            acts.contains(&BridgeAction::RevokeSink(vec![tp(0)])),
            "{acts:?}"
        );
        assert!(
            !acts.iter().any(|a| matches!(a, BridgeAction::Push(_))),
            "{acts:?}"
        );
        assert!(f.assigned().is_empty());
        // Records of a partition not assigned are dropped, not pushed.
        f.handle_records(now, [rec(0, 200)]);
        assert_eq!(f.held(), 0);
        f.handle_assigned(vec![(tp(0), Some(150))]);
        run(&mut f, now, sink_takes_all);
        f.handle_records(now, (150..152).map(|o| rec(0, o)));
        assert!(f.waits_for_room());
        f.handle_room();
        let acts = run(&mut f, now, sink_takes_all);
        let pushed: Vec<i64> = acts
            .iter()
            .filter_map(|a| match a {
                BridgeAction::Push(r) => Some(r.iter().map(|r| r.offset).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(pushed, vec![150, 151]);
    }

    #[test]
    fn c1_commits_only_partitions_it_owns() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), None)]);
        run(&mut f, now, sink_takes_all);
        let later = now + Duration::from_secs(5);
        // The sink reports a position for a partition this member does not own.
        let acts = run(&mut f, later, |a| match a {
            BridgeAction::Flush => Some(ActionReport::Flushed(FlushOutcome::from_flush(Ok(vec![
                (tp(0), 3),
                (tp(1), 9),
            ])))),
            BridgeAction::Commit(o) => Some(ActionReport::Committed(o.clone(), Ok(()))),
            _ => None,
        });
        assert!(
            acts.contains(&BridgeAction::Commit(vec![(tp(0), 3)])),
            "{acts:?}"
        );
        assert!(!acts.contains(&BridgeAction::Commit(vec![(tp(0), 3), (tp(1), 9)])));
    }

    fn fail_flush(a: &BridgeAction) -> Option<ActionReport> {
        match a {
            BridgeAction::Flush => Some(ActionReport::Flushed(FlushOutcome {
                complete: false,
                timed_out: false,
                offsets: vec![],
            })),
            BridgeAction::Push(_) => Some(ActionReport::Pushed(VecDeque::new(), None)),
            BridgeAction::Seek { tp, offset } => {
                Some(ActionReport::Sought(tp.clone(), *offset, Ok(())))
            }
            _ => None,
        }
    }

    #[test]
    fn h1_a_rewind_seeks_back_a_partition_that_was_never_pushed() {
        let now = Instant::now();
        let mut f = flow(now);
        // P1's committed position is unknown (no commit yet).
        f.handle_assigned(vec![(tp(0), Some(0)), (tp(1), None)]);
        run(&mut f, now, sink_takes_all);
        f.handle_records(now, (0..5).map(|o| rec(0, o)));
        run(&mut f, now, sink_full);
        // P1's first records are held behind the full sink, never pushed.
        f.handle_records(now, (0..500).map(|o| rec(1, o)));
        let later = now + Duration::from_secs(5);
        let acts = run(&mut f, later, fail_flush);
        assert!(acts.contains(&BridgeAction::RewindSink), "{acts:?}");
        assert!(
            acts.contains(&BridgeAction::Seek {
                tp: tp(0),
                offset: 0
            }),
            "{acts:?}"
        );
        assert!(
            acts.contains(&BridgeAction::Seek {
                tp: tp(1),
                offset: 0
            }),
            "{acts:?}"
        );
        assert_eq!(f.held(), 0);
        assert_eq!(f.stats().rewinds, 1);
    }

    #[test]
    fn h2_a_failed_seek_is_retried_and_its_partition_dropped_meanwhile() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), Some(10))]);
        run(&mut f, now, sink_takes_all);
        f.handle_records(now, (10..20).map(|o| rec(0, o)));
        run(&mut f, now, sink_takes_all);
        let later = now + Duration::from_secs(5);
        let mut seeks = 0;
        run(&mut f, later, |a| match a {
            BridgeAction::Seek { tp, offset } => {
                seeks += 1;
                Some(ActionReport::Sought(
                    tp.clone(),
                    *offset,
                    Err("ERR__STATE".into()),
                ))
            }
            other => fail_flush(other),
        });
        assert_eq!(seeks, 1);
        assert_eq!(f.stats().seek_errors, 1);
        // The consumer is still at 20: those records are from the wrong place.
        f.handle_records(later, (20..25).map(|o| rec(0, o)));
        assert_eq!(f.held(), 0, "records after a failed seek are dropped");
        // Retried after the backoff; then records from the rewind point flow again.
        let retry = f.poll_timeout();
        assert!(retry > later && retry <= later + Duration::from_millis(200));
        let acts = run(&mut f, retry, |a| match a {
            BridgeAction::Seek { tp, offset } => {
                Some(ActionReport::Sought(tp.clone(), *offset, Ok(())))
            }
            _ => None,
        });
        assert_eq!(
            acts,
            vec![BridgeAction::Seek {
                tp: tp(0),
                offset: 10
            }]
        );
        f.handle_records(retry, [rec(0, 10)]);
        assert_eq!(f.held(), 1);
    }

    #[test]
    fn m5_commit_every_counts_records() {
        let now = Instant::now();
        let mut k = KafkaConfig::new("b", "g", vec!["t".into()]);
        k.commit_interval = Duration::from_secs(3600);
        k.commit_every = Some(100);
        let mut f = BridgeFlow::new(&k, now);
        f.handle_assigned(vec![(tp(0), None)]);
        run(&mut f, now, sink_takes_all);
        // One poll delivers 1000 records: ten checkpoints, one per 100 records pushed.
        f.handle_records(now, (0..1000).map(|o| rec(0, o)));
        let acts = run(&mut f, now, |a| match a {
            BridgeAction::Flush => {
                Some(ActionReport::Flushed(FlushOutcome::from_flush(Ok(vec![]))))
            }
            other => sink_takes_all(other),
        });
        let flushes = acts.iter().filter(|a| **a == BridgeAction::Flush).count();
        let pushes: Vec<usize> = acts
            .iter()
            .filter_map(|a| match a {
                BridgeAction::Push(r) => Some(r.len()),
                _ => None,
            })
            .collect();
        assert_eq!(flushes, 10, "{pushes:?}");
        assert_eq!(pushes, vec![100; 10]);
    }

    #[test]
    fn m6_stop_drops_held_records_and_ends_after_one_flush() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), Some(0))]);
        run(&mut f, now, sink_takes_all);
        f.handle_records(now, (0..50).map(|o| rec(0, o)));
        run(&mut f, now, sink_full);
        f.stop(now);
        assert_eq!(f.held(), 0);
        assert!(!f.may_poll_consumer(now));
        let acts = run(&mut f, now, |a| match a {
            BridgeAction::Flush => Some(ActionReport::Flushed(FlushOutcome {
                complete: false,
                timed_out: true,
                offsets: vec![(tp(0), 0)],
            })),
            BridgeAction::Commit(o) => Some(ActionReport::Committed(o.clone(), Ok(()))),
            _ => None,
        });
        assert_eq!(acts[0], BridgeAction::Flush);
        assert!(acts.contains(&BridgeAction::Commit(vec![(tp(0), 0)])));
        assert!(!acts.iter().any(|a| matches!(a, BridgeAction::Push(_))));
        assert!(f.is_stopped());
    }

    #[test]
    fn l7_a_long_stall_pauses_and_keeps_polling_the_consumer() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), None), (tp(1), None)]);
        run(&mut f, now, sink_takes_all);
        f.handle_records(now, (0..HELD_MAX_RECORDS as i64).map(|o| rec(0, o)));
        run(&mut f, now, sink_full);
        assert!(f.waits_for_room() && !f.may_poll_consumer(now));
        assert_eq!(f.poll_timeout(), now + PAUSE_AFTER);
        let later = now + PAUSE_AFTER;
        let acts = run(&mut f, later, sink_full);
        assert_eq!(acts, vec![BridgeAction::Pause(vec![tp(0), tp(1)])]);
        assert!(
            f.may_poll_consumer(later),
            "paused: poll to serve callbacks"
        );
        // A partition assigned meanwhile is paused too; room resumes them all.
        f.handle_assigned(vec![(tp(2), None)]);
        let acts = run(&mut f, later, sink_full);
        assert!(acts.contains(&BridgeAction::Pause(vec![tp(2)])), "{acts:?}");
        f.handle_room();
        let acts = run(&mut f, later, sink_takes_all);
        assert!(
            acts.contains(&BridgeAction::Resume(vec![tp(0), tp(1), tp(2)])),
            "{acts:?}"
        );
    }

    #[test]
    fn l3_held_records_are_bounded_by_bytes() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), None)]);
        run(&mut f, now, sink_takes_all);
        let big = |o: i64| Record::new(tp(0), o, Some("k"), Some(vec![0u8; 1 << 20]));
        f.handle_records(now, (0..3).map(big));
        run(&mut f, now, sink_full);
        assert!(f.room() > 0, "3 MiB held: room for more");
        f.handle_records(now, [big(3)]);
        assert_eq!(f.room(), 0, "4 MiB held: the consumer must not be polled");
        assert!(!f.may_poll_consumer(now));
    }

    #[test]
    fn a_timed_out_checkpoint_commits_what_is_safe_and_keeps_the_rest() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), None)]);
        run(&mut f, now, sink_takes_all);
        let later = now + Duration::from_secs(5);
        let acts = run(&mut f, later, |a| match a {
            BridgeAction::Flush => Some(ActionReport::Flushed(FlushOutcome {
                complete: false,
                timed_out: true,
                offsets: vec![(tp(0), 7)],
            })),
            BridgeAction::Commit(o) => Some(ActionReport::Committed(o.clone(), Ok(()))),
            _ => None,
        });
        assert_eq!(
            acts,
            vec![
                BridgeAction::Flush,
                BridgeAction::Commit(vec![(tp(0), 7)]),
                BridgeAction::CommittedSink(vec![(tp(0), 7)])
            ]
        );
        assert!(f.may_poll_consumer(later));
        assert_eq!(f.stats().rewinds, 0);
        assert_eq!(f.stats().committed, vec![(tp(0), 7)]);
    }

    /// The stop line lists the committed positions in partition order, whichever partition
    /// committed first (it listed them in the order of their first commits).
    #[test]
    fn committed_positions_are_listed_in_partition_order() {
        let now = Instant::now();
        let mut f = flow(now);
        f.handle_assigned(vec![(tp(0), None), (tp(1), None)]);
        run(&mut f, now, sink_takes_all);
        let mut flushes = [vec![(tp(1), 4)], vec![(tp(0), 6), (tp(1), 9)]].into_iter();
        for at in [5, 10] {
            let later = now + Duration::from_secs(at);
            let offsets = flushes.next().expect("two flushes");
            run(&mut f, later, |a| match a {
                BridgeAction::Flush => Some(ActionReport::Flushed(FlushOutcome {
                    complete: false,
                    timed_out: true,
                    offsets: offsets.clone(),
                })),
                BridgeAction::Commit(o) => Some(ActionReport::Committed(o.clone(), Ok(()))),
                _ => None,
            });
        }
        assert_eq!(f.stats().committed, vec![(tp(0), 6), (tp(1), 9)]);
    }

    /// A flow committing between checkpoints every `interval` (checkpoints an hour apart),
    /// `parts` assigned.
    fn flow_committing_every(
        now: Instant,
        interval: Duration,
        parts: Vec<(TopicPartition, Option<i64>)>,
    ) -> BridgeFlow {
        let mut k = KafkaConfig::new("b", "g", vec!["t".into()]);
        k.commit_interval = Duration::from_secs(3600);
        k.commit_min_interval = interval;
        let mut f = BridgeFlow::new(&k, now);
        f.handle_assigned(parts);
        run(&mut f, now, sink_takes_all);
        f
    }

    #[test]
    fn between_checkpoints_acknowledged_positions_are_committed_at_most_every_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = flow_committing_every(t0, ms(100), vec![(tp(0), Some(10)), (tp(1), Some(20))]);
        assert_eq!(
            f.poll_timeout(),
            t0 + ms(100),
            "the next commit is the deadline"
        );
        f.handle_records(t0, (10..15).map(|o| rec(0, o)));
        let acts = run(&mut f, t0, sink_takes_all);
        assert!(
            !acts.iter().any(|a| matches!(a, BridgeAction::Positions)),
            "asked before the interval: {acts:?}"
        );
        // 100 ms later: the sink has 10..12 acknowledged on partition 0, nothing new on 1
        // (its position is the committed one), and reports a partition no longer ours.
        let t1 = t0 + ms(100);
        let positions = vec![(tp(0), 13), (tp(1), 20), (tp(9), 5)];
        let acts = run(&mut f, t1, |a| match a {
            BridgeAction::Positions => Some(ActionReport::Positions(positions.clone())),
            BridgeAction::Commit(o) => Some(ActionReport::Committed(o.clone(), Ok(()))),
            other => sink_takes_all(other),
        });
        assert_eq!(
            acts,
            vec![
                BridgeAction::Positions,
                BridgeAction::Commit(vec![(tp(0), 13)]),
                BridgeAction::CommittedSink(vec![(tp(0), 13)]),
            ]
        );
        assert_eq!(f.stats().committed, vec![(tp(0), 13)]);
        // Asked again only after another interval; the same positions commit nothing.
        assert!(run(&mut f, t1 + ms(99), sink_takes_all).is_empty());
        let acts = run(&mut f, t1 + ms(100), |a| match a {
            BridgeAction::Positions => Some(ActionReport::Positions(vec![(tp(0), 13)])),
            other => sink_takes_all(other),
        });
        assert_eq!(acts, vec![BridgeAction::Positions], "committed twice");
    }

    #[test]
    fn no_commit_between_checkpoints_for_a_partition_sought_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = flow_committing_every(t0, ms(100), vec![(tp(0), Some(10))]);
        f.handle_records(t0, (10..15).map(|o| rec(0, o)));
        run(&mut f, t0, sink_takes_all);
        // A failed checkpoint rewinds; the seek back fails and waits for its retry.
        f.phase = Phase::Checkpoint { rewind: true };
        f.steps.push_back(Step::Rewind);
        let acts = run(&mut f, t0, |a| match a {
            BridgeAction::Seek { tp, offset } => Some(ActionReport::Sought(
                tp.clone(),
                *offset,
                Err("injected".into()),
            )),
            other => sink_takes_all(other),
        });
        assert!(
            acts.contains(&BridgeAction::Seek {
                tp: tp(0),
                offset: 10
            }),
            "{acts:?}"
        );
        let acts = run(&mut f, t0 + ms(100), |a| match a {
            // A sink that (wrongly) still reports a position past the rewind.
            BridgeAction::Positions => Some(ActionReport::Positions(vec![(tp(0), 15)])),
            other => sink_takes_all(other),
        });
        assert!(
            !acts.iter().any(|a| matches!(a, BridgeAction::Commit(_))),
            "committed a partition waiting for its seek: {acts:?}"
        );
    }

    #[test]
    fn a_slow_commit_spaces_the_next_commit_between_checkpoints() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = flow_committing_every(t0, ms(100), vec![(tp(0), Some(10))]);
        let t1 = t0 + ms(100);
        assert_eq!(f.poll_action(t1), Some(BridgeAction::Positions));
        f.handle_report(t1, ActionReport::Positions(vec![(tp(0), 12)]));
        assert_eq!(
            f.poll_action(t1),
            Some(BridgeAction::Commit(vec![(tp(0), 12)]))
        );
        // Kafka took 50 ms to answer: the next one no sooner than 450 ms after that.
        let t2 = t1 + ms(50);
        f.handle_report(t2, ActionReport::Committed(vec![(tp(0), 12)], Ok(())));
        run(&mut f, t2, sink_takes_all);
        assert_eq!(f.poll_timeout(), t2 + ms(450));
        assert!(run(&mut f, t2 + ms(449), sink_takes_all).is_empty());
        assert_eq!(f.poll_action(t2 + ms(450)), Some(BridgeAction::Positions));
    }

    #[test]
    fn a_closed_sink_answering_no_positions_does_not_stall_the_flow() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = flow_committing_every(t0, ms(100), vec![(tp(0), Some(10))]);
        f.handle_records(t0, (10..15).map(|o| rec(0, o)));
        // The runtime could not reach the sink (closed): `Done` for the positions.
        let acts = run(&mut f, t0 + ms(100), |a| match a {
            BridgeAction::Push(_) => Some(ActionReport::Pushed(
                VecDeque::new(),
                Some(PushRefusal::Closed),
            )),
            _ => None,
        });
        assert_eq!(acts[0], BridgeAction::Positions, "{acts:?}");
        assert!(
            acts.iter().any(|a| matches!(a, BridgeAction::Push(_))),
            "the flow stalled after the unanswered positions: {acts:?}"
        );
        assert!(f.fatal_error().is_some());
    }

    #[test]
    fn a_zero_commit_min_interval_commits_at_checkpoints_only() {
        let t0 = Instant::now();
        let mut f = flow_committing_every(t0, Duration::ZERO, vec![(tp(0), Some(10))]);
        f.handle_records(t0, (10..15).map(|o| rec(0, o)));
        let later = t0 + Duration::from_secs(60);
        let acts = run(&mut f, later, sink_takes_all);
        assert!(
            acts.iter().all(|a| matches!(a, BridgeAction::Push(_))),
            "{acts:?}"
        );
        assert_eq!(f.poll_timeout(), t0 + Duration::from_secs(3600));
    }
}
