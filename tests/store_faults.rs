//! Faults of the object store around a commit (tansu + moto, the real binary).
//!
//! A commit whose PUT succeeded but whose answer was lost (failpoint `commit_answer_lost`, a
//! fault that returns an error after the commit landed) is settled by reading the log: the
//! replica finds its own `txn` and file there and counts the commit as done. It never takes its
//! own commit for another replica's (no fence, no `StrataCommitsFenced` alert), never commits the
//! rows twice, and loses nothing.

mod common;

use std::time::Duration;

use common::{produce, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_read_from_the_log_not_fenced() {
    let setup = Setup::new("answer-lost", 3).await;
    let mut produced = produce(&setup.topic, 3_000, 100, 21).await;
    // The answer of the replica's 2nd commit is lost.
    let replica = setup.spawn(&[("STRATA_FAILPOINT_FAULT", "commit_answer_lost:2")]);
    setup.catch_up(&produced, &[&replica]).await;
    produced.extend(produce(&setup.topic, 2_000, 100, 22).await);
    setup.catch_up(&produced, &[&replica]).await;
    setup.assert_exact(&produced).await;
    assert!(
        replica.log_contains("a commit whose answer was lost is in the log"),
        "the lost answer was not settled from the log:\n{}",
        replica.tail(30)
    );
    assert_eq!(
        replica
            .metric("strata_commits_fenced_total")
            .await
            .unwrap_or(0.0),
        0.0,
        "the replica took its own commit for another's"
    );
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
}
