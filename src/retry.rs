//! The one retry helper for every outside dependency (registry, object store, brokers, topics):
//! exponential backoff with jitter, in one of three paces, and a wait that ends at once on
//! shutdown so a retry never eats into the shutdown grace period.
//!
//! A loop that retries looks the same everywhere:
//! `Err(e) => { log; if !retry.wait().await { return Err(e) } }`.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How fast to retry, by what is being waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// An outage of a dependency (registry, object store, broker): 200 ms doubling to 10 s.
    Outage,
    /// Something only an operator can fix (a permission, a topic): 1 s doubling to 60 s.
    Operator,
    /// A lost commit race: 20 ms doubling to 2 s (the next attempt usually wins at once).
    CommitRace,
}

impl Pace {
    fn bounds(self) -> (Duration, Duration) {
        match self {
            Pace::Outage => (Duration::from_millis(200), Duration::from_secs(10)),
            Pace::Operator => (Duration::from_secs(1), Duration::from_secs(60)),
            Pace::CommitRace => (Duration::from_millis(20), Duration::from_secs(2)),
        }
    }
}

/// Exponential backoff with jitter, for a caller that waits on its own (a loop that must keep
/// answering other events meanwhile).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(pace: Pace) -> Self {
        let (next, max) = pace.bounds();
        Self { next, max }
    }

    /// The current delay plus up to as much again in jitter; doubles the delay for next time.
    pub fn delay(&mut self) -> Duration {
        let jitter = rand::random_range(0..=self.next.as_millis().max(1) as u64);
        let delay = self.next + Duration::from_millis(jitter);
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// A write that failed and waits for its next attempt without blocking its event loop (Silver's
/// flush, Gold stage 2's commit): the loop goes on answering rebalances, and a tick makes the
/// attempt once it is [`due`](Stall::due).
#[derive(Debug)]
pub struct Stall {
    at: Instant,
    backoff: Backoff,
}

impl Stall {
    pub fn new(pace: Pace) -> Self {
        Self {
            at: Instant::now(),
            backoff: Backoff::new(pace),
        }
    }

    /// Schedules the next attempt after one more backoff delay, and returns that delay.
    pub fn again(&mut self) -> Duration {
        let delay = self.backoff.delay();
        self.at = Instant::now() + delay;
        delay
    }

    /// Whether the next attempt is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.at
    }
}

pub struct Retry {
    backoff: Backoff,
    /// `None` only for commit races, which the final drain must be able to finish.
    stop: Option<CancellationToken>,
}

impl Retry {
    /// Retries at `pace`, until `stop` is cancelled.
    pub fn new(pace: Pace, stop: &CancellationToken) -> Self {
        Self {
            backoff: Backoff::new(pace),
            stop: Some(stop.clone()),
        }
    }

    /// Retries of a lost commit race. They are not cut short by shutdown: the drain after SIGTERM
    /// commits through them, bounded by `STRATA_COMMIT_RETRIES` and the grace period.
    pub fn commit_races() -> Self {
        Self {
            backoff: Backoff::new(Pace::CommitRace),
            stop: None,
        }
    }

    /// Sleeps the current delay plus up to as much again in jitter, then doubles the delay.
    /// Returns false, at once, when shutdown was requested before or during the wait: the caller
    /// stops retrying.
    pub async fn wait(&mut self) -> bool {
        let delay = self.backoff.delay();
        match &self.stop {
            Some(stop) if stop.is_cancelled() => false,
            Some(stop) => tokio::select! {
                () = tokio::time::sleep(delay) => true,
                () = stop.cancelled() => false,
            },
            None => {
                tokio::time::sleep(delay).await;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_ends_a_wait_at_once() {
        let stop = CancellationToken::new();
        let mut retry = Retry::new(Pace::Operator, &stop);
        let started = std::time::Instant::now();
        let waiter = tokio::spawn(async move { retry.wait().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        assert!(!waiter.await.expect("join"), "a stopped wait says stop");
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        // Once stopped, every later wait returns at once too.
        let mut again = Retry::new(Pace::Outage, &stop);
        assert!(!again.wait().await);
    }

    #[tokio::test]
    async fn delays_double_up_to_the_pace_maximum() {
        let stop = CancellationToken::new();
        let mut retry = Retry::new(Pace::CommitRace, &stop);
        for _ in 0..10 {
            retry.backoff.delay();
        }
        assert_eq!(retry.backoff.next, Duration::from_secs(2));
        assert!(retry.backoff.delay() <= Duration::from_secs(4));
        assert!(retry.wait().await);
    }
}
