//! Readiness: why a replica is not ready. Several reasons can hold at once and each clears on its
//! own, so one recovering dependency cannot report ready while another is still down. A
//! dead-letter topic that cannot be written is a reason of its own, naming the topic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Why a replica is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Starting = 1,
    Registry = 2,
    Lake = 4,
    ShuttingDown = 8,
}

impl NotReady {
    const ALL: [NotReady; 4] = [
        NotReady::Starting,
        NotReady::Registry,
        NotReady::Lake,
        NotReady::ShuttingDown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            NotReady::Starting => "starting (no assignment from the consumer group yet)",
            NotReady::Registry => "schema registry unreachable",
            NotReady::Lake => "object store refuses writes",
            NotReady::ShuttingDown => "shutting down",
        }
    }
}

/// The reasons that hold now; ready when none does. Starts as [`NotReady::Starting`].
pub struct Readiness {
    /// Bits of [`NotReady`].
    reasons: AtomicU8,
    /// Dead-letter topics that cannot be written now, with why.
    blocked_dead_letters: Mutex<BTreeMap<String, String>>,
    /// Why the Kafka cluster refuses or cannot be reached (authentication, TLS, no broker),
    /// whether that names a cause, and when it was last reported.
    kafka: Mutex<Option<(String, bool, Instant)>>,
    /// Which store refuses writes, and how, while [`NotReady::Lake`] holds for a flush.
    lake: Mutex<Option<String>>,
    /// Other named problems (a stopped partition), by what they concern.
    problems: Mutex<BTreeMap<String, String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            reasons: AtomicU8::new(NotReady::Starting as u8),
            blocked_dead_letters: Mutex::new(BTreeMap::new()),
            kafka: Mutex::new(None),
            lake: Mutex::new(None),
            problems: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Readiness {
    /// Marks `reason` as holding (`true`) or cleared (`false`).
    pub fn set(&self, reason: NotReady, holds: bool) {
        if holds {
            self.reasons.fetch_or(reason as u8, Ordering::Relaxed);
        } else {
            self.reasons.fetch_and(!(reason as u8), Ordering::Relaxed);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.reasons.load(Ordering::Relaxed) == 0
            && self.blocked().is_empty()
            && self.problems().is_empty()
            && self.kafka_problem().is_none()
    }

    /// Sets (or clears, with `None`) why the Kafka cluster cannot be used, with whether the
    /// reason names a cause: a reason without one never hides one that does. Returns whether
    /// anything changed.
    pub fn set_kafka_problem(&self, why: Option<(&str, bool)>) -> bool {
        let mut current = self.kafka.lock().unwrap_or_else(PoisonError::into_inner);
        match (current.as_mut(), why) {
            (Some((now, _, seen)), Some((new, _))) if now == new => {
                *seen = Instant::now();
                false
            }
            (Some((_, true, _)), Some((_, false))) => false,
            (None, None) => false,
            (_, new) => {
                *current = new.map(|(why, specific)| (why.to_string(), specific, Instant::now()));
                true
            }
        }
    }

    /// Clears the Kafka problem unless it was reported within `quiet`: a broker connection being
    /// up says little while another connection is still refused (an authorization error arrives
    /// over a connection that is up).
    pub fn clear_kafka_problem_after(&self, quiet: Duration) -> bool {
        let mut current = self.kafka.lock().unwrap_or_else(PoisonError::into_inner);
        if current
            .as_ref()
            .is_some_and(|(_, _, seen)| seen.elapsed() >= quiet)
        {
            *current = None;
            return true;
        }
        false
    }

    /// Sets (or clears) which store refuses the flush's writes and why, with [`NotReady::Lake`].
    pub fn set_lake_problem(&self, why: Option<&str>) {
        *self.lake.lock().unwrap_or_else(PoisonError::into_inner) = why.map(str::to_string);
        self.set(NotReady::Lake, why.is_some());
    }

    fn kafka_problem(&self) -> Option<String> {
        self.kafka
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(why, _, _)| why.clone())
    }

    /// Sets (or clears) a named problem concerning `what`; returns whether the problem started
    /// (set) or ended (cleared) with this call.
    pub fn set_problem(&self, what: &str, why: Option<&str>) -> bool {
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        match why {
            Some(why) => problems.insert(what.to_string(), why.to_string()).is_none(),
            None => problems.remove(what).is_some(),
        }
    }

    fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn lake_problem(&self) -> Option<String> {
        self.lake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Marks a dead-letter topic as unwritable; returns whether `why` is new for it.
    pub fn block_dead_letters(&self, topic: &str, why: &str) -> bool {
        let previous = self.blocked().insert(topic.to_string(), why.to_string());
        previous.as_deref() != Some(why)
    }

    /// Clears a dead-letter topic; returns whether it was blocked.
    pub fn unblock_dead_letters(&self, topic: &str) -> bool {
        self.blocked().remove(topic).is_some()
    }

    fn blocked(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        // The map stays consistent whatever a panicking holder did: every update is one call.
        self.blocked_dead_letters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The reasons that currently hold, for `/readyz`.
    pub fn reasons(&self) -> Vec<String> {
        let bits = self.reasons.load(Ordering::Relaxed);
        let mut reasons: Vec<String> = NotReady::ALL
            .iter()
            .filter(|r| bits & (**r as u8) != 0)
            .map(|r| match (r, self.lake_problem()) {
                (NotReady::Lake, Some(why)) => format!("{}: {why}", r.as_str()),
                _ => r.as_str().to_string(),
            })
            .collect();
        if let Some(why) = self.kafka_problem() {
            reasons.push(format!("kafka: {why}"));
        }
        reasons.extend(
            self.blocked()
                .iter()
                .map(|(topic, why)| format!("dead-letter topic {topic} cannot be written ({why})")),
        );
        reasons.extend(self.problems());
        reasons
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_refusal_with_a_cause_is_not_hidden_by_no_broker_reachable() {
        let readiness = Readiness::default();
        readiness.set(NotReady::Starting, false);
        assert!(readiness.is_ready());
        assert!(readiness.set_kafka_problem(Some(("authentication failed", true))));
        assert!(!readiness.set_kafka_problem(Some(("no broker reachable", false))));
        assert!(!readiness.is_ready());
        assert_eq!(readiness.reasons(), ["kafka: authentication failed"]);
        // Another cause replaces it; a connection up clears it.
        assert!(readiness.set_kafka_problem(Some(("certificate not trusted", true))));
        assert!(!readiness.clear_kafka_problem_after(Duration::from_secs(60)));
        assert!(readiness.clear_kafka_problem_after(Duration::ZERO));
        assert!(readiness.is_ready());
        assert!(readiness.set_kafka_problem(Some(("no broker reachable", false))));
        assert_eq!(readiness.reasons(), ["kafka: no broker reachable"]);
    }

    #[test]
    fn a_refusing_store_is_named_until_it_takes_writes() {
        let readiness = Readiness::default();
        readiness.set(NotReady::Starting, false);
        readiness.set_lake_problem(Some("s3://lake/silver/order: 503 SlowDown"));
        assert!(!readiness.is_ready());
        assert_eq!(
            readiness.reasons(),
            ["object store refuses writes: s3://lake/silver/order: 503 SlowDown"]
        );
        readiness.set_lake_problem(None);
        assert!(readiness.is_ready());
    }
}
