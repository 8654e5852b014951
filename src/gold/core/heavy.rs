//! Space-Saving (Metwally et al.): the heavy hitters of a stream in bounded memory. With `capacity`
//! counters, every key whose true count exceeds `total / capacity` is tracked, and each tracked
//! count overestimates by at most its recorded error. Deterministic for a given input order, so a
//! replay of the same records finds the same hot keys.

use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct SpaceSaving {
    capacity: usize,
    /// key → (count, overestimate)
    counters: HashMap<Vec<u8>, (u64, u64)>,
    total: u64,
    /// The keys that held the smallest count, `floor`, when they were last listed, sorted with the
    /// largest key first: the next to be replaced is at the end. A key counted since then holds
    /// more than `floor` and is skipped when it comes up. Empty: list them again.
    lowest: Vec<Vec<u8>>,
    /// The smallest count when `lowest` was listed. Counts never fall, so no key holds less.
    floor: u64,
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            counters: HashMap::new(),
            total: 0,
            lowest: Vec::new(),
            floor: 0,
        }
    }

    pub fn add(&mut self, key: &[u8], weight: u64) {
        self.total += weight;
        if let Some((count, _)) = self.counters.get_mut(key) {
            *count += weight;
            return;
        }
        if self.counters.len() < self.capacity {
            self.counters.insert(key.to_vec(), (weight, 0));
            // A new key may hold the smallest count: list them again when one is needed.
            self.lowest.clear();
            return;
        }
        // Replace the smallest counter (ties: the smallest key, so the choice is deterministic).
        let Some((victim, min)) = self.smallest() else {
            return;
        };
        self.counters.remove(&victim);
        if weight == 0 {
            // It holds the smallest count too.
            self.lowest.clear();
        }
        self.counters.insert(key.to_vec(), (min + weight, min));
    }

    /// The counter with the smallest count (ties: the smallest key), taken off `lowest`. Listing
    /// the smallest counts costs a pass over the counters once per `floor`, not once per new key:
    /// with more distinct keys than counters, nearly every record brings a new key.
    fn smallest(&mut self) -> Option<(Vec<u8>, u64)> {
        loop {
            match self.lowest.pop() {
                Some(key) => {
                    // Counted again since it was listed: no longer the smallest.
                    if self
                        .counters
                        .get(&key)
                        .is_some_and(|(c, _)| *c == self.floor)
                    {
                        return Some((key, self.floor));
                    }
                }
                None => {
                    let floor = self.counters.values().map(|(c, _)| *c).min()?;
                    let mut lowest: Vec<Vec<u8>> = self
                        .counters
                        .iter()
                        .filter(|(_, (c, _))| *c == floor)
                        .map(|(k, _)| k.clone())
                        .collect();
                    lowest.sort_unstable_by(|a, b| b.cmp(a));
                    self.lowest = lowest;
                    self.floor = floor;
                }
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Keys whose guaranteed count (count − overestimate) is at least `share` of the total,
    /// sorted by count, largest first.
    pub fn hot(&self, share: f64) -> Vec<(Vec<u8>, u64)> {
        let bar = (self.total as f64 * share).ceil() as u64;
        let mut hot: Vec<(Vec<u8>, u64)> = self
            .counters
            .iter()
            .filter(|(_, (count, error))| count - error >= bar.max(1))
            .map(|(k, (count, _))| (k.clone(), *count))
            .collect();
        hot.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        hot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_the_key_with_forty_percent() {
        let mut sketch = SpaceSaving::new(16);
        for i in 0..10_000u32 {
            let key = if i % 5 < 2 { 0 } else { 1 + i % 997 };
            sketch.add(&key.to_le_bytes(), 1);
        }
        let hot = sketch.hot(0.1);
        assert_eq!(hot.len(), 1);
        assert_eq!(hot[0].0, 0u32.to_le_bytes());
        assert!(hot[0].1 >= 4_000);
    }

    /// Space-Saving as first written here: a pass over every counter for each new key once the
    /// sketch is full. Replays must find the same hot keys whichever version computed them.
    fn reference(capacity: usize, adds: &[(Vec<u8>, u64)]) -> HashMap<Vec<u8>, (u64, u64)> {
        let mut counters: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        for (key, weight) in adds {
            if let Some((count, _)) = counters.get_mut(key) {
                *count += weight;
                continue;
            }
            if counters.len() < capacity {
                counters.insert(key.clone(), (*weight, 0));
                continue;
            }
            let (victim, (min, _)) = counters
                .iter()
                .min_by(|a, b| a.1 .0.cmp(&b.1 .0).then_with(|| a.0.cmp(b.0)))
                .map(|(k, v)| (k.clone(), *v))
                .expect("full");
            counters.remove(&victim);
            counters.insert(key.clone(), (min + weight, min));
        }
        counters
    }

    #[test]
    fn many_distinct_keys_replace_the_smallest_counter_in_key_order() {
        let adds: Vec<(Vec<u8>, u64)> = (0..5_000u32)
            .map(|i| {
                (
                    (i * 7919 % 1_013).to_be_bytes().to_vec(),
                    1 + u64::from(i % 3),
                )
            })
            .collect();
        let mut sketch = SpaceSaving::new(64);
        for (key, weight) in &adds {
            sketch.add(key, *weight);
        }
        assert_eq!(sketch.counters, reference(64, &adds));
    }

    proptest! {
        /// Every key above total/capacity is tracked, and no reported count underestimates.
        #[test]
        fn guarantees_hold(keys in prop::collection::vec(0u8..40, 1..2000), capacity in 4usize..20) {
            let mut sketch = SpaceSaving::new(capacity);
            let mut truth: HashMap<u8, u64> = HashMap::new();
            for k in &keys {
                sketch.add(&[*k], 1);
                *truth.entry(*k).or_default() += 1;
            }
            let total = keys.len() as u64;
            for (k, n) in &truth {
                if *n * capacity as u64 > total {
                    let tracked = sketch.counters.get(&vec![*k]).copied();
                    prop_assert!(tracked.is_some(), "key {} with {} of {} lost", k, n, total);
                    let (count, error) = tracked.unwrap_or_default();
                    prop_assert!(count >= *n && count - error <= *n);
                }
            }
        }

        /// The same counters as the first version after every record, zero weights included.
        #[test]
        fn counts_as_the_first_version_did(
            adds in prop::collection::vec((0u8..30, 0u64..3), 1..600),
            capacity in 1usize..12,
        ) {
            let adds: Vec<(Vec<u8>, u64)> = adds.into_iter().map(|(k, w)| (vec![k], w)).collect();
            let mut sketch = SpaceSaving::new(capacity);
            for (i, (key, weight)) in adds.iter().enumerate() {
                sketch.add(key, *weight);
                prop_assert_eq!(&sketch.counters, &reference(capacity, &adds[..=i]));
            }
        }
    }
}
