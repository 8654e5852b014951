//! Faults of the object store (tansu + moto, the real binary): an outage longer than
//! `max.poll.interval.ms` (503 SlowDown, then connection resets) in front of moto, a commit refused
//! after its files were uploaded, and a commit whose answer was lost.
//!
//! During an outage the replica pauses fetching and keeps polling, so it stays in its group; it
//! is not ready and `/readyz` names the store; afterwards everything is exact. A flush whose
//! commit failed keeps the files it uploaded: no file is written twice.
//!
//! A commit whose PUT succeeded but whose answer was lost (failpoint `commit_answer_lost`, a
//! fault that returns an error after the commit landed) is settled by reading the log: the
//! replica finds its own `txn` and file there and counts the commit as done. It never takes its
//! own commit for another replica's (no fence, no `StrataCommitsFenced` alert), never commits the
//! rows twice, and loses nothing.

mod common;

use std::time::Duration;

use common::s3_faults::{Fault, FaultyS3, Matching};
use common::{produce, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_the_poll_interval_pauses_fetching_and_loses_nothing() {
    let setup = Setup::new("store-outage", 3).await;
    let s3 = FaultyS3::start().await;
    let mut produced = produce(&setup.topic, 3_000, 100, 31).await;
    let replica = setup.spawn(&[
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        // The outage below lasts three times as long.
        ("STRATA_KAFKA_MAX_POLL_INTERVAL_MS", "15000"),
        ("STRATA_MAINTENANCE_INTERVAL", "1h"),
    ]);
    setup.catch_up(&produced, &[&replica]).await;
    let rebalances = replica.metric("strata_rebalances_total").await;

    s3.fail(Fault::SlowDown, Matching::all());
    let outage = std::time::Instant::now();
    produced.extend(produce(&setup.topic, 6_000, 100, 32).await);
    let mut named = false;
    while outage.elapsed() < Duration::from_secs(30) {
        if let Some((503, body)) = replica.http_get("/readyz").await {
            named |= body.contains("object store refuses writes")
                && body.contains(&setup.lake)
                && body.contains("SlowDown");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        named,
        "/readyz never named the refusing store:\n{}",
        replica.tail(20)
    );
    // Then the connections are reset for at least 15 s, until a request has met a reset: the
    // replica's retries of an outage back off to 10 s plus up to as much again in jitter, so a
    // fixed window may see none.
    s3.fail(Fault::Reset, Matching::all());
    let resets = std::time::Instant::now();
    while resets.elapsed() < Duration::from_secs(15)
        || (s3.resets() == 0 && resets.elapsed() < Duration::from_secs(60))
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s3.resets() > 0, "no request met a reset in 60 s");
    s3.heal();
    let healed = std::time::Instant::now();
    setup.catch_up(&produced, &[&replica]).await;
    eprintln!(
        "store outage of {:?}: caught up {:?} after the store returned",
        healed - outage,
        healed.elapsed()
    );
    setup.assert_exact(&produced).await;
    assert_eq!(
        replica.metric("strata_rebalances_total").await,
        rebalances,
        "the replica left its group during the outage:\n{}",
        replica.tail(30)
    );
    assert!(
        replica.log_contains("fetching paused") && replica.log_contains("fetching resumes"),
        "{}",
        replica.tail(30)
    );
    assert_eq!(replica.http_status("/readyz").await, 200);
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_whose_commit_is_refused_keeps_its_uploaded_files() {
    let setup = Setup::new("commit-refused", 3).await;
    let s3 = FaultyS3::start().await;
    let replica = setup.spawn(&[
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("STRATA_MAINTENANCE_INTERVAL", "1h"),
    ]);
    let mut produced = produce(&setup.topic, 2_000, 100, 41).await;
    setup.catch_up(&produced, &[&replica]).await;
    // Data files land; every write to the log is throttled.
    s3.fail(
        Fault::SlowDown,
        Matching {
            method: Some("PUT"),
            path_contains: Some("_delta_log"),
        },
    );
    produced.extend(produce(&setup.topic, 4_000, 100, 42).await);
    // A flush failed after its files were uploaded, and kept them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !replica.log_lines().iter().any(|l| {
        l.split("\"uploaded_files_kept\":")
            .nth(1)
            .is_some_and(|n| !n.starts_with('0'))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush kept its uploaded files:\n{}",
            replica.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    s3.heal();
    let healed = std::time::Instant::now();
    setup.catch_up(&produced, &[&replica]).await;
    eprintln!(
        "log writes refused for 20 s: caught up {:?} after the store returned",
        healed.elapsed()
    );
    setup.assert_exact(&produced).await;
    let orphans = strata::lake::verify::unreferenced_files(setup.table_url())
        .await
        .expect("list");
    assert!(
        orphans.is_empty(),
        "files uploaded again on retry, leaving {} unreferenced: {orphans:?}",
        orphans.len()
    );
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_read_from_the_log_not_fenced() {
    let setup = Setup::new("answer-lost", 3).await;
    let mut produced = produce(&setup.topic, 3_000, 100, 21).await;
    // The answer of the replica's 2nd commit is lost.
    let replica = setup.spawn(&[("STRATA_FAILPOINT_FAULT", "commit_answer_lost:2")]);
    setup.catch_up(&produced, &[&replica]).await;
    produced.extend(produce(&setup.topic, 2_000, 100, 22).await);
    let lost = std::time::Instant::now();
    assert_settled_as_its_own(&setup, &produced, replica, "an answer lost", lost).await;
}

/// A commit whose answer was lost just as the store went away: its PUT landed, and for a while
/// every request after it is refused, so the log cannot be read at once to settle it. The flush
/// stalls; once the store returns, its next attempt reads the log first, finds its own commit and
/// counts it done: no fence, no `StrataCommitsFenced`, no row written twice, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_as_the_store_went_away_is_settled_when_it_returns() {
    let setup = Setup::new("answer-lost-outage", 3).await;
    let s3 = FaultyS3::start().await;
    let mut produced = produce(&setup.topic, 3_000, 100, 41).await;
    let replica = setup.spawn(&[
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("STRATA_MAINTENANCE_INTERVAL", "1h"),
    ]);
    setup.catch_up(&produced, &[&replica]).await;

    // The next commit (a PUT of a log entry) lands but its answer is lost; from then on the
    // store answers SlowDown to everything.
    s3.fail_then(
        Fault::AnswerLost,
        Matching {
            method: Some("PUT"),
            path_contains: Some("_delta_log/0"),
        },
        Fault::SlowDown,
        Matching::all(),
    );
    produced.extend(produce(&setup.topic, 2_000, 100, 42).await);
    let waited = std::time::Instant::now();
    while s3.hits() < 3 && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        s3.hits() >= 3,
        "no commit met the fault:\n{}",
        replica.tail(30)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    s3.heal();
    let healed = std::time::Instant::now();
    assert_settled_as_its_own(
        &setup,
        &produced,
        replica,
        "an answer lost, then 10 s of SlowDown",
        healed,
    )
    .await;
}

/// After a commit whose answer was lost: the replica settles it from the log (its log says so;
/// the landed commit may already hold every row, so the table alone cannot tell), the table is
/// exact, the replica never took its own commit for another's, and its accounting balances.
async fn assert_settled_as_its_own(
    setup: &Setup,
    produced: &common::Produced,
    replica: common::Replica,
    fault: &str,
    since: std::time::Instant,
) {
    assert!(
        replica
            .wait_log(
                "a commit whose answer was lost is in the log",
                Duration::from_secs(60)
            )
            .await,
        "the lost answer was not settled from the log:\n{}",
        replica.tail(30)
    );
    setup.catch_up(produced, &[&replica]).await;
    eprintln!("{fault}: caught up {:?} after it", since.elapsed());
    setup.assert_exact(produced).await;
    assert_eq!(
        replica
            .metric("strata_commits_fenced_total")
            .await
            .unwrap_or(0.0),
        0.0,
        "the replica took its own commit for another's:\n{}",
        replica.tail(30)
    );
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
}

/// A rebalance during a store outage. A second replica joins, and every request to the store
/// fails from the moment its tables are open: it is assigned partitions whose progress it cannot
/// read. It assigns them paused and goes on polling, trying the claim again from a tick, so an
/// outage three times `max.poll.interval.ms` costs neither replica its membership (no rebalance
/// storm). Once the store returns, the partitions resume where the table says: exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_assigned_during_a_store_outage_wait_paused_without_leaving_the_group() {
    let setup = Setup::new("claim-outage", 4).await;
    let s3 = FaultyS3::start().await;
    let mut produced = produce(&setup.topic, 2_000, 100, 51).await;
    let env = [
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("STRATA_KAFKA_MAX_POLL_INTERVAL_MS", "15000"),
        ("STRATA_MAINTENANCE_INTERVAL", "1h"),
    ];
    let first = setup.spawn(&env);
    setup.catch_up(&produced, &[&first]).await;
    let second = setup.spawn(&env);
    assert!(
        second
            .wait_log("\"table open\"", Duration::from_secs(30))
            .await,
        "the second replica never opened its table:\n{}",
        second.tail(20)
    );
    s3.fail(Fault::SlowDown, Matching::all());
    let outage = std::time::Instant::now();
    produced.extend(produce(&setup.topic, 2_000, 100, 52).await);
    assert!(
        second
            .wait_log(
                "reading table progress failed; the partitions wait for it",
                Duration::from_secs(30)
            )
            .await,
        "no claim met the outage:\n{}",
        second.tail(30)
    );
    tokio::time::sleep(Duration::from_secs(45).saturating_sub(outage.elapsed())).await;
    s3.heal();
    let healed = std::time::Instant::now();
    setup.catch_up(&produced, &[&first, &second]).await;
    eprintln!(
        "store outage of {:?} across a rebalance: caught up {:?} after the store returned",
        healed - outage,
        healed.elapsed()
    );
    setup.assert_exact(&produced).await;
    for replica in [&first, &second] {
        assert!(
            !replica.log_contains("MAXPOLL"),
            "a replica exceeded its poll interval and left its group:\n{}",
            replica.tail(30)
        );
    }
    second.stop(Duration::from_secs(30));
    first.stop(Duration::from_secs(30));
}
