//! Exponential backoff with jitter, the one retry pacing used for every outside dependency
//! (registry, object store, dead-letter topic, commit races).

use std::time::Duration;

pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// Sleeps the current delay plus up to as much again in jitter, then doubles the delay.
    pub async fn wait(&mut self) {
        let jitter = rand::random_range(0..=self.next.as_millis().max(1) as u64);
        tokio::time::sleep(self.next + Duration::from_millis(jitter)).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// [`Self::wait`], cut short by `stop`; returns false when it was.
    pub async fn wait_unless(&mut self, stop: &tokio_util::sync::CancellationToken) -> bool {
        tokio::select! {
            _ = self.wait() => true,
            _ = stop.cancelled() => false,
        }
    }
}
