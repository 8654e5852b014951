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
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            counters: HashMap::new(),
            total: 0,
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
            return;
        }
        // Replace the smallest counter (ties: the smallest key, so the choice is deterministic).
        let Some((victim, (min, _))) = self
            .counters
            .iter()
            .min_by(|a, b| a.1 .0.cmp(&b.1 .0).then_with(|| a.0.cmp(b.0)))
            .map(|(k, v)| (k.clone(), *v))
        else {
            return;
        };
        self.counters.remove(&victim);
        self.counters.insert(key.to_vec(), (min + weight, min));
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
    }
}
