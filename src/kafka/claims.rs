//! Partitions a stage has not claimed yet. A stage answers an assignment with where each
//! partition resumes, which it reads from the tables (the claim); after a fence it reads that
//! again and seeks there (a reclaim). While the object store refuses that read, the stage keeps
//! the claim here and tries again from a tick with backoff, instead of retrying inside its event
//! loop: the source has assigned the partitions paused (or the stage ignores their records until
//! its seek) and goes on polling, and the stage goes on answering revocations. So an outage that
//! meets a rebalance or a fence costs no group membership (and no rebalance storm).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::models::TopicPartition;
use crate::retry::{Pace, Stall};

/// Where each partition resumes: the last offset already handled, or `None` for the beginning.
pub type Resume = HashMap<TopicPartition, Option<i64>>;

/// One claim waiting to be read.
pub struct Claim {
    pub partitions: Vec<TopicPartition>,
    /// The source waiting for an assignment's answer; `None` for a reclaim after a fence, whose
    /// partitions are running: the stage seeks them itself.
    reply: Option<oneshot::Sender<Resume>>,
    /// Set after a failed attempt: when to try again.
    stall: Option<Stall>,
    attempts: u32,
}

impl Claim {
    /// How many attempts failed so far.
    pub fn failed_attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether this claim follows a fence (no source waits for its answer).
    pub fn is_reclaim(&self) -> bool {
        self.reply.is_none()
    }

    /// Tells the source where the partitions resume; it seeks there and starts fetching.
    pub fn answer(self, resume: Resume) {
        if let Some(reply) = self.reply {
            let _ = reply.send(resume);
        }
    }
}

/// The claims waiting to be read, oldest first.
#[derive(Default)]
pub struct Claims(Vec<Claim>);

impl Claims {
    /// An assignment: the source waits for its answer with the partitions paused.
    pub fn push(&mut self, partitions: Vec<TopicPartition>, reply: oneshot::Sender<Resume>) {
        self.add(partitions, Some(reply));
    }

    /// A reclaim after a fence: the partitions' progress is read again, then the stage seeks.
    pub fn push_reclaim(&mut self, partitions: Vec<TopicPartition>) {
        self.add(partitions, None);
    }

    fn add(&mut self, partitions: Vec<TopicPartition>, reply: Option<oneshot::Sender<Resume>>) {
        self.0.push(Claim {
            partitions,
            reply,
            stall: None,
            attempts: 0,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes out the claims whose next attempt is due (a new one at once), oldest first. The
    /// caller answers each one that succeeds and gives back each one that fails
    /// ([`Claims::retry_later`]).
    pub fn take_due(&mut self) -> Vec<Claim> {
        let (due, waiting) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|c| c.stall.as_ref().is_none_or(Stall::due));
        self.0 = waiting;
        due
    }

    /// Keeps a claim whose attempt failed, for another attempt after one more backoff delay;
    /// returns that delay.
    pub fn retry_later(&mut self, mut claim: Claim) -> Duration {
        claim.attempts += 1;
        self.defer(claim)
    }

    /// Keeps a claim that was not attempted (the stage cannot take it yet, not a failure), for
    /// another look after one more backoff delay; returns that delay.
    pub fn defer(&mut self, mut claim: Claim) -> Duration {
        let delay = claim
            .stall
            .get_or_insert_with(|| Stall::new(Pace::Outage))
            .again();
        self.0.push(claim);
        delay
    }

    /// Revoked partitions are no longer claimed; an assignment left with none is dropped.
    pub fn revoke(&mut self, partitions: &[TopicPartition]) {
        for claim in &mut self.0 {
            claim.partitions.retain(|tp| !partitions.contains(tp));
        }
        self.0.retain(|c| !c.partitions.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_claim_waits_its_backoff_and_revoked_partitions_leave_it() {
        let mut claims = Claims::default();
        let (reply, mut answer) = oneshot::channel();
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        claims.push(vec![a.clone(), b.clone()], reply);
        let due = claims.take_due();
        assert_eq!(due.len(), 1, "a new claim is due at once");
        assert!(claims.is_empty());
        for claim in due {
            assert_eq!(claim.failed_attempts(), 0);
            assert!(claims.retry_later(claim) > Duration::ZERO);
        }
        assert!(claims.take_due().is_empty(), "a failed claim waits");
        claims.revoke(std::slice::from_ref(&a));
        assert!(!claims.is_empty());
        claims.revoke(std::slice::from_ref(&b));
        assert!(
            claims.is_empty(),
            "a claim with no partition left is dropped"
        );
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "its source learns that no answer comes"
        );
    }

    #[test]
    fn a_reclaim_waits_like_an_assignment_but_answers_no_source() {
        let mut claims = Claims::default();
        let a = TopicPartition::new("t", 0);
        claims.push_reclaim(vec![a.clone()]);
        let mut due = claims.take_due();
        let claim = due.pop().expect("a new reclaim is due at once");
        assert!(claim.is_reclaim());
        claims.retry_later(claim);
        assert!(claims.take_due().is_empty(), "a failed reclaim waits");
        claims.revoke(std::slice::from_ref(&a));
        assert!(claims.is_empty(), "a revoked partition is not reclaimed");

        let (reply, answer) = oneshot::channel();
        claims.push(vec![a.clone()], reply);
        let claim = claims.take_due().pop().expect("due");
        assert!(!claim.is_reclaim());
        claim.answer(Resume::from([(a, Some(4))]));
        assert_eq!(
            answer.blocking_recv().expect("answered").values().next(),
            Some(&Some(4))
        );
    }
}
