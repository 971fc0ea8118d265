//! In-flight publishes by send sequence.
//!
//! Sequences are handed out in increasing order and acknowledgements mostly come back in
//! that order, so a ring indexed by `seq - base` inserts, finds and removes in O(1) and
//! keeps entries in place (a `BTreeMap` shifted every remaining entry of a node on each
//! removal of the oldest: most of the core's time per record).

use std::collections::VecDeque;

/// A map from increasing `u64` sequences to `T`, in sequence order.
#[derive(Debug)]
pub(crate) struct SendOrder<T> {
    /// The sequence of `slots[0]`.
    base: u64,
    /// `None` where an entry was removed out of order; never `None` at the front.
    slots: VecDeque<Option<T>>,
    len: usize,
}

impl<T> Default for SendOrder<T> {
    fn default() -> Self {
        Self {
            base: 0,
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> SendOrder<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds an entry; `seq` must be above every sequence inserted before.
    pub(crate) fn insert(&mut self, seq: u64, value: T) {
        if self.slots.is_empty() {
            self.base = seq;
        }
        let end = self.base + self.slots.len() as u64;
        assert!(
            seq >= end,
            "sequence {seq} inserted out of order (next is {end})"
        );
        for _ in end..seq {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(value));
        self.len += 1;
    }

    fn index(&self, seq: u64) -> Option<usize> {
        usize::try_from(seq.checked_sub(self.base)?).ok()
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&T> {
        self.slots.get(self.index(seq)?)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut T> {
        let i = self.index(seq)?;
        self.slots.get_mut(i)?.as_mut()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<T> {
        let i = self.index(seq)?;
        let value = self.slots.get_mut(i)?.take()?;
        self.len -= 1;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(value)
    }

    /// The entry with the lowest sequence.
    pub(crate) fn first(&self) -> Option<&T> {
        self.slots.front()?.as_ref()
    }

    /// Sequences, lowest first.
    pub(crate) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(move |(i, _)| base + i as u64)
    }

    /// Every entry, lowest sequence first.
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> + '_ {
        self.slots.iter().flatten()
    }

    /// Every entry, lowest sequence first.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.slots.iter_mut().flatten()
    }

    /// Every entry, lowest sequence first.
    pub(crate) fn into_values(self) -> impl DoubleEndedIterator<Item = T> {
        self.slots.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::SendOrder;

    #[test]
    fn behaves_as_an_ordered_map() {
        // Against a BTreeMap, with removals in and out of order.
        let mut ours = SendOrder::default();
        let mut model = std::collections::BTreeMap::new();
        let mut seq = 10u64;
        for round in 0..2000u64 {
            // Insert with occasional gaps in the sequence.
            seq += 1 + round % 3 / 2;
            ours.insert(seq, round);
            model.insert(seq, round);
            // Remove something: the oldest, or one in the middle.
            let victim = if round % 5 == 0 {
                model.keys().nth(model.len() / 2).copied()
            } else if round % 2 == 0 {
                model.keys().next().copied()
            } else {
                None
            };
            if let Some(v) = victim {
                assert_eq!(ours.remove(v), model.remove(&v));
            }
            assert_eq!(ours.remove(seq + 100), None);
            assert_eq!(ours.len(), model.len());
            assert_eq!(ours.first(), model.values().next());
            assert_eq!(ours.get(seq), model.get(&seq));
            assert!(ours.keys().eq(model.keys().copied()));
            assert!(ours.values().eq(model.values()));
        }
        if let Some((&k, _)) = model.iter().next() {
            *ours.get_mut(k).expect("present") += 1;
            *model.get_mut(&k).expect("present") += 1;
        }
        ours.values_mut().for_each(|v| *v += 7);
        model.values_mut().for_each(|v| *v += 7);
        assert!(ours.into_values().rev().eq(model.into_values().rev()));
    }
}
