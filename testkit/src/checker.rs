//! The delivery checker: did every record arrive, in order per topic, with duplicates only
//! where a fault allows them? Shared by the simulated-broker properties and the
//! real-broker suites: it sees only (topic, payload) pairs, so any subscriber can feed it.
//!
//! Records are identified by their payload, which tests make unique (a sequence number).

use std::collections::BTreeMap;

use bytes::Bytes;

/// A record the sink was given and that must arrive, in push order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The MQTT topic it must arrive on.
    pub topic: String,
    /// Its payload (unique per record).
    pub payload: Bytes,
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Distinct expected records that arrived.
    pub arrived: usize,
    /// Arrivals beyond the first of a record.
    pub duplicates: usize,
    /// Replay runs: times a topic went back to an earlier record.
    pub replays: usize,
}

/// Checks arrivals (`(topic, payload)`, in the order a broker or subscriber saw them)
/// against what was expected:
/// 1. every expected record arrived at least once, on its topic;
/// 2. per topic, arrivals follow push order, except that after a fault the sink may go
///    back and repeat earlier records (a replay); a record never arrives before an earlier
///    record of its topic that had not arrived yet;
/// 3. without a fault (`faults == false`) nothing arrives twice;
/// 4. nothing arrives that was not expected.
pub fn check(
    expected: &[Expected],
    arrivals: &[(String, Bytes)],
    faults: bool,
) -> Result<Report, String> {
    check_with(expected, arrivals, faults, 0)
}

/// [`check`], except that a record may arrive ahead of at most `reorder_window` earlier
/// records of its topic that had not arrived yet. QoS 2 through Mosquitto needs this after
/// a fault: it forwards a message at PUBREL, so a publish that was in flight but not yet
/// released when the sink died is forwarded, on replay, after later ones that had been
/// released (at most the in-flight window).
pub fn check_with(
    expected: &[Expected],
    arrivals: &[(String, Bytes)],
    faults: bool,
    reorder_window: usize,
) -> Result<Report, String> {
    // Per topic: the expected payloads in order, and each payload's index.
    let mut order: BTreeMap<&str, BTreeMap<&Bytes, usize>> = BTreeMap::new();
    for e in expected {
        let topic = order.entry(e.topic.as_str()).or_default();
        let n = topic.len();
        if topic.insert(&e.payload, n).is_some() {
            return Err(format!(
                "test error: payload {:?} expected twice on {}",
                e.payload, e.topic
            ));
        }
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new(); // lowest never-seen index
    let mut ahead: BTreeMap<&str, std::collections::BTreeSet<usize>> = BTreeMap::new();
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    let mut count: BTreeMap<(&str, &Bytes), usize> = BTreeMap::new();
    let mut report = Report::default();
    for (i, (topic, payload)) in arrivals.iter().enumerate() {
        let Some(idx) = order.get(topic.as_str()).and_then(|t| t.get(payload)) else {
            return Err(format!(
                "arrival #{i}: {payload:?} on {topic} was never expected there"
            ));
        };
        let idx = *idx;
        let next_new = seen.entry(topic.as_str()).or_insert(0);
        let early = ahead.entry(topic.as_str()).or_default();
        if idx > *next_new + reorder_window {
            return Err(format!(
                "arrival #{i}: record #{idx} of topic {topic} arrived before record #{} \
                 of that topic had ever arrived (out of order{})",
                *next_new,
                if reorder_window > 0 {
                    format!(", beyond the reorder window of {reorder_window}")
                } else {
                    String::new()
                }
            ));
        }
        if idx == *next_new {
            *next_new += 1;
            while early.remove(&*next_new) {
                *next_new += 1;
            }
        } else if idx > *next_new {
            early.insert(idx);
        }
        let prev = last.insert(topic.as_str(), idx);
        if prev.is_some_and(|p| idx <= p) {
            report.replays += 1;
        }
        let c = count.entry((topic.as_str(), payload)).or_insert(0);
        *c += 1;
        if *c == 1 {
            report.arrived += 1;
        } else {
            report.duplicates += 1;
            if !faults {
                return Err(format!(
                    "arrival #{i}: {payload:?} on {topic} arrived {} times without any fault",
                    *c
                ));
            }
        }
    }
    if report.arrived != expected.len() {
        let missing: Vec<_> = expected
            .iter()
            .filter(|e| !count.contains_key(&(e.topic.as_str(), &e.payload)))
            .take(5)
            .map(|e| format!("{:?} on {}", e.payload, e.topic))
            .collect();
        return Err(format!(
            "{} of {} records never arrived, e.g. {}",
            expected.len() - report.arrived,
            expected.len(),
            missing.join(", ")
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(t: &str, p: &str) -> Expected {
        Expected {
            topic: t.into(),
            payload: Bytes::copy_from_slice(p.as_bytes()),
        }
    }
    fn a(t: &str, p: &str) -> (String, Bytes) {
        (t.into(), Bytes::copy_from_slice(p.as_bytes()))
    }

    #[test]
    fn accepts_interleaved_topics_and_replays_after_faults() {
        let exp = [e("x", "1"), e("y", "2"), e("x", "3"), e("x", "4")];
        let ok = [
            a("y", "2"),
            a("x", "1"),
            a("x", "3"),
            a("x", "1"),
            a("x", "3"),
            a("x", "4"),
        ];
        let r = check(&exp, &ok, true).expect("valid with faults");
        assert_eq!((r.arrived, r.duplicates, r.replays), (4, 2, 1));
        assert!(check(&exp, &ok, false).is_err(), "duplicates need a fault");
    }

    #[test]
    fn a_reorder_window_admits_bounded_reordering_only() {
        let exp = [e("x", "1"), e("x", "2"), e("x", "3"), e("x", "4")];
        let swapped = [a("x", "2"), a("x", "1"), a("x", "3"), a("x", "4")];
        assert!(check(&exp, &swapped, true).is_err());
        let r = check_with(&exp, &swapped, true, 1).expect("within the window");
        assert_eq!(r.arrived, 4);
        let far = [a("x", "3"), a("x", "1"), a("x", "2"), a("x", "4")];
        assert!(check_with(&exp, &far, true, 1).is_err(), "two ahead");
        assert!(check_with(&exp, &far, true, 2).is_ok());
        assert!(
            check_with(&exp, &[a("x", "2"), a("x", "3")], true, 3).is_err(),
            "loss"
        );
    }

    #[test]
    fn rejects_loss_reordering_and_strangers() {
        let exp = [e("x", "1"), e("x", "2")];
        assert!(check(&exp, &[a("x", "1")], true).is_err());
        assert!(check(&exp, &[a("x", "2"), a("x", "1")], true).is_err());
        assert!(check(&exp, &[a("x", "1"), a("x", "2"), a("z", "9")], true).is_err());
        assert!(check(&exp, &[a("x", "1"), a("x", "2")], false).is_ok());
    }
}
