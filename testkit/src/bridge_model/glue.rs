//! The glue: what a runtime does with a flow, a sink, a consumer and a dead-letter
//! producer, pass by pass (see the order in the parent module's docs). Everything a runtime
//! must not decide, it does not: it executes actions and reports facts.

use std::time::{Duration, Instant};

use mqtt_sink_core::{
    ActionReport, BridgeAction, CommitOffsets, Event, FlushOutcome, PushRefusal, Record, SinkError,
};

use super::{BridgeHarness, MAX_ACTIONS, MAX_PASSES, MIN_STEP};
use crate::sim::is_flush_outcome;
use crate::sim_kafka::{Callback, MemberId};

impl BridgeHarness {
    /// One pass of member `m`'s runtime loop, without time passing (but a flush it executes
    /// drives the sink's clock). Returns whether the consumer delivered records or ran a
    /// callback, room was reported, or the member stopped: when not, a runtime waits in its
    /// consumer poll until the next deadline.
    pub fn pass(&mut self, m: MemberId) -> bool {
        if !self.members[m].up {
            return false;
        }
        let mut progressed = false;
        if self.setup.defects.push_revoked_held {
            progressed |= self.push_stale(m);
        }
        self.drain_actions(m);
        if self.members[m].flow.is_stopped() {
            self.finish_stop(m);
            return true;
        }
        if let Some(e) = self.members[m].flow.fatal_error() {
            let v = format!("(d) member {m}: fatal error: {e}");
            self.inv.violation(v);
            self.members[m].up = false;
            self.kafka.crash(m);
            return true;
        }
        let mb = &mut self.members[m];
        let now = mb.h.now;
        let may_poll = mb.flow.may_poll_consumer(now);
        let waits = mb.flow.waits_for_room();
        if self.setup.defects.poll_before_room {
            if may_poll {
                progressed |= self.poll_consumer(m);
            } else if waits && !mb.h.sink.is_full() {
                mb.flow.handle_room();
                progressed = true;
            }
        } else if waits {
            // The sink first; then the consumer, if it may be polled (to hold more, or
            // paused, to serve the group's callbacks), hands over what is ready.
            if !mb.h.sink.is_full() {
                mb.flow.handle_room();
                progressed = true;
            }
            if may_poll {
                progressed |= self.poll_consumer(m);
            }
        } else if may_poll {
            progressed |= self.poll_consumer(m);
        }
        progressed
    }

    /// Runs member `m`'s loop until its clock reaches `until` (or it goes down).
    pub fn run_member(&mut self, m: MemberId, until: Instant) {
        for _ in 0..MAX_PASSES {
            if !self.members[m].up {
                return;
            }
            if self.pass(m) {
                self.members[m].spinning = 0;
                continue;
            }
            let mb = &mut self.members[m];
            let now = mb.h.now;
            if now >= until {
                return;
            }
            let flow_t = mb.flow.poll_timeout();
            let mut wake = until.min(flow_t);
            if let Some(t) = mb.h.next_deadline() {
                wake = wake.min(t);
            }
            if let Some(t) = self.kafka.next_delivery_due(m) {
                wake = wake.min(t);
            }
            if flow_t <= now && wake == flow_t {
                mb.spinning += 1;
                if mb.spinning == 1000 {
                    let v = format!(
                        "(g) member {m}: the flow's poll_timeout stays in the past with \
                         nothing to do: {:?}",
                        mb.flow
                    );
                    self.inv.violation(v);
                }
            } else {
                mb.spinning = 0;
            }
            let mb = &mut self.members[m];
            let wake = wake.max(now + MIN_STEP).min(until);
            mb.h.step_until(wake);
            self.pump_dead_letters(m);
        }
        let v = format!("(d) member {m}: no end to its loop in {MAX_PASSES} passes");
        self.inv.violation(v);
    }

    fn trace(&mut self, m: MemberId, what: String) {
        if self.tracing {
            let t = self.members[m].h.elapsed();
            self.trace.push(format!("{t:?} member {m}: {what}"));
        }
    }

    fn drain_actions(&mut self, m: MemberId) -> bool {
        let mut any = false;
        for _ in 0..MAX_ACTIONS {
            let now = self.members[m].h.now;
            let Some(a) = self.members[m].flow.poll_action(now) else {
                return any;
            };
            any = true;
            self.trace(m, action_text(&a));
            let report = self.execute(m, a);
            let mb = &mut self.members[m];
            mb.flow.handle_report(mb.h.now, report);
        }
        let v = format!("(d) member {m}: the flow produced {MAX_ACTIONS} actions in a row");
        self.inv.violation(v);
        any
    }

    fn execute(&mut self, m: MemberId, action: BridgeAction) -> ActionReport {
        let d = self.setup.defects;
        match action {
            BridgeAction::Pause(tps) => {
                self.kafka.pause(m, &tps);
                ActionReport::Done
            }
            BridgeAction::Resume(tps) => {
                self.kafka.resume(m, &tps);
                ActionReport::Done
            }
            BridgeAction::Seek { tp, offset } => {
                let mut r = self.kafka.seek(m, &tp, offset);
                if d.seek_failure_reported_ok {
                    r = Ok(());
                }
                ActionReport::Sought(tp, offset, r)
            }
            BridgeAction::Commit(offsets) => {
                let commit = if d.commit_sink_positions {
                    self.members[m].h.sink.commit_positions()
                } else {
                    offsets.clone()
                };
                self.observe();
                self.inv.check_commit(m, &commit);
                let r = self.kafka.commit(m, &commit);
                if r.is_ok() {
                    self.stats.commits += 1;
                }
                ActionReport::Committed(offsets, r)
            }
            BridgeAction::Push(records) => {
                let coords: Vec<_> = if d.push_revoked_held {
                    records.iter().map(Record::coords).collect()
                } else {
                    Vec::new()
                };
                let sent = records.len();
                let mb = &mut self.members[m];
                if d.positions_pushed {
                    for r in &records {
                        mb.pushed_to.insert(r.tp.clone(), r.offset + 1);
                    }
                }
                let (rest, why) = mb.h.sink.push_batch(mb.h.now, records);
                for c in coords.iter().take(sent - rest.len()) {
                    mb.unpushed.remove(c);
                }
                mb.h.drain();
                self.pump_dead_letters(m);
                ActionReport::Pushed(rest, why)
            }
            BridgeAction::Flush => ActionReport::Flushed(self.flush(m)),
            BridgeAction::AssignSink(parts) => {
                let mb = &mut self.members[m];
                for (tp, committed) in parts {
                    mb.h.sink.assign(tp, committed);
                }
                mb.h.drain();
                ActionReport::Done
            }
            BridgeAction::RevokeSink(tps) => {
                let mb = &mut self.members[m];
                if !d.skip_sink_revoke {
                    for tp in &tps {
                        mb.h.sink.revoke(tp);
                    }
                }
                mb.h.drain();
                ActionReport::Done
            }
            BridgeAction::RewindSink => {
                let mb = &mut self.members[m];
                let _ = mb.h.sink.rewind();
                mb.unpushed.clear();
                mb.h.drain();
                ActionReport::Done
            }
            BridgeAction::CommittedSink(offsets) => {
                let mb = &mut self.members[m];
                mb.h.sink.handle_committed(&offsets);
                mb.h.drain();
                ActionReport::Done
            }
            BridgeAction::Positions => {
                let mb = &self.members[m];
                ActionReport::Positions(match d.positions_pushed {
                    true => mb.pushed_to.clone().into_iter().collect(),
                    false => mb.h.sink.commit_positions(),
                })
            }
            other => {
                let v = format!("(d) member {m}: an action the model does not know: {other:?}");
                self.inv.violation(v);
                ActionReport::Done
            }
        }
    }

    /// Executes a flush: `begin_flush` with the sink's deadline, then drives the sink (and
    /// the dead-letter producer) until the outcome.
    fn flush(&mut self, m: MemberId) -> FlushOutcome {
        self.stats.flushes += 1;
        let mb = &mut self.members[m];
        let now = mb.h.now;
        let before = mb.h.events.len();
        let deadline = mb.h.sink.flush_deadline(now);
        if let Err(e) = mb.h.sink.begin_flush(now, deadline) {
            let v = format!("(d) member {m}: the flow asked for a flush while one ran: {e}");
            self.inv.violation(v);
            return FlushOutcome::from_flush(Err(SinkError::Closed));
        }
        mb.h.drain();
        for _ in 0..MAX_PASSES {
            self.pump_dead_letters(m);
            let mb = &mut self.members[m];
            if let Some((_, e)) = mb.h.events[before..]
                .iter()
                .find(|(_, e)| is_flush_outcome(e))
            {
                let outcome = FlushOutcome::from_flush(flush_result(e));
                if !outcome.complete {
                    self.stats.incomplete_flushes += 1;
                }
                return outcome;
            }
            let mut wake = mb.h.next_deadline();
            if let Some(t) = self.kafka.next_delivery_due(m) {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
            let Some(wake) = wake else {
                break;
            };
            mb.h.step_until(wake.max(mb.h.now));
        }
        let v = format!("(d) member {m}: a flush never ended");
        self.inv.violation(v);
        FlushOutcome::from_flush(Err(SinkError::Closed))
    }

    /// Produces the dead letters the sink asked for; hands it the delivery reports due.
    fn pump_dead_letters(&mut self, m: MemberId) {
        let at_send = self.setup.defects.dead_letter_confirmed_at_send;
        for _ in 0..1000 {
            let mb = &mut self.members[m];
            let now = mb.h.now;
            let requests = std::mem::take(&mut mb.h.dead_letter_requests);
            let reports = self.kafka.poll_delivery_reports(m, now);
            if requests.is_empty() && reports.is_empty() {
                return;
            }
            for r in requests {
                let coords = r.coords();
                self.kafka.produce_dead_letter(m, now, r);
                if at_send {
                    mb.h.sink.handle_dead_lettered(&coords);
                }
            }
            if !at_send {
                for (coords, result) in reports {
                    match result {
                        Ok(()) => mb.h.sink.handle_dead_lettered(&coords),
                        Err(e) => mb.h.sink.handle_dead_letter_failed(&coords, e),
                    }
                }
            }
            mb.h.drain();
        }
    }

    /// The consumer poll: rebalance callbacks (each drains the flow before it returns), then
    /// records.
    fn poll_consumer(&mut self, m: MemberId) -> bool {
        let mut progressed = false;
        for _ in 0..16 {
            let Some(cb) = self.kafka.next_callback(m) else {
                break;
            };
            progressed = true;
            self.stats.callbacks += 1;
            self.trace(m, format!("callback {cb:?}"));
            let mb = &mut self.members[m];
            let now = mb.h.now;
            match cb {
                Callback::Assign(parts) => mb.flow.handle_assigned(parts),
                Callback::Revoke(tps) => {
                    if mb.flow.held() > 0 {
                        self.stats.revokes_with_held += 1;
                    }
                    if self.setup.defects.push_revoked_held {
                        let stale: Vec<_> = mb
                            .unpushed
                            .iter()
                            .filter(|(c, _)| tps.contains(&c.tp))
                            .map(|(c, _)| c.clone())
                            .collect();
                        for c in stale {
                            if let Some(r) = mb.unpushed.remove(&c) {
                                mb.stale.push_back(r);
                            }
                        }
                    }
                    mb.flow.handle_revoked(now, tps);
                }
            }
            self.drain_actions(m);
            if self.members[m].flow.is_revoking() {
                let v = format!("(d) member {m}: a revoke callback would return mid-revoke");
                self.inv.violation(v);
            }
            self.kafka.callback_done(m);
        }
        let mb = &mut self.members[m];
        let now = mb.h.now;
        if !mb.flow.may_poll_consumer(now) {
            return progressed;
        }
        let records = self.kafka.fetch(m, mb.flow.room());
        if !records.is_empty() {
            progressed = true;
            let what = format!(
                "fetched {:?}",
                records
                    .iter()
                    .map(|r| r.coords().to_string())
                    .collect::<Vec<_>>()
            );
            self.trace(m, what);
            let mb = &mut self.members[m];
            if self.setup.defects.push_revoked_held {
                for r in &records {
                    mb.unpushed.insert(r.coords(), r.clone());
                }
            }
            mb.flow.handle_records(now, records);
        }
        progressed
    }

    /// Defect C1: pushes the kept records of revoked partitions, as far as the sink takes
    /// them.
    fn push_stale(&mut self, m: MemberId) -> bool {
        let mb = &mut self.members[m];
        if mb.stale.is_empty() {
            return false;
        }
        let before = mb.stale.len();
        let stale = std::mem::take(&mut mb.stale);
        let (mut rest, why) = mb.h.sink.push_batch(mb.h.now, stale);
        match why {
            Some(PushRefusal::OutOfOrder { .. }) => {
                rest.pop_front();
            }
            Some(PushRefusal::Closed) => rest.clear(),
            _ => {}
        }
        let taken = before != rest.len();
        mb.stale = rest;
        mb.h.drain();
        taken
    }

    /// The flow stopped: the runtime closes the consumer (its last revoke callback runs on
    /// the stopped flow), closes the sink, and the group rebalances without the member.
    fn finish_stop(&mut self, m: MemberId) {
        let tps = self.kafka.leave(m);
        let mb = &mut self.members[m];
        if !tps.is_empty() {
            let now = mb.h.now;
            mb.flow.handle_revoked(now, tps);
            self.drain_actions(m);
        }
        let mb = &mut self.members[m];
        let now = mb.h.now;
        mb.h.sink.close(now);
        mb.h.drain();
        let until = mb.h.now + Duration::from_millis(100);
        while mb.h.step_until(until) {}
        mb.up = false;
        self.stats.stops += 1;
        self.target.remove(&m);
        self.rebalance_balanced(self.setup.protocol);
    }
}

fn action_text(a: &BridgeAction) -> String {
    match a {
        BridgeAction::Push(r) => format!(
            "Push {} records {:?}",
            r.len(),
            r.iter().map(|r| r.coords().to_string()).collect::<Vec<_>>()
        ),
        a => format!("{a:?}"),
    }
}

fn flush_result(e: &Event) -> Result<CommitOffsets, SinkError> {
    match e {
        Event::FlushCompleted { offsets } => Ok(offsets.clone()),
        Event::FlushTimedOut { unacked, offsets } => Err(SinkError::FlushTimedOut {
            unacked: *unacked,
            offsets: offsets.clone(),
        }),
        Event::FlushFailed {
            coords,
            reason,
            offsets,
        } => Err(SinkError::FlushFailed {
            message: format!("record {coords}: {reason}"),
            offsets: offsets.clone(),
        }),
        _ => Err(SinkError::Closed),
    }
}
