//! Exactly-once from Bronze to Silver on a real broker (tansu) and a real S3 API (moto): every test
//! compares the table with the produced records, offset by offset, plus the values.

mod common;

use std::time::Duration;

use common::{produce, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_events_over_six_partitions_land_exactly_once() {
    let setup = Setup::new("bulk", 6).await;
    let produced = produce(&setup.topic, 100_000, 500, 1).await;
    assert_eq!(produced.good.len() + produced.bad.len(), 100_000);
    let replica = setup.spawn(&[("STRATA_FLUSH_INTERVAL", "3s")]);
    setup.catch_up(&produced, &[&replica]).await;
    let written = replica
        .metric("strata_records_written_total")
        .await
        .expect("metric");
    let dead = replica
        .metric("strata_records_dead_lettered_total")
        .await
        .expect("metric");
    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        assert_eq!(replica.http_status(path).await, status, "{path}");
    }
    // Group offsets follow the table, so the usual lag tooling (and our lag gauge) reaches zero.
    let mut lag = None;
    for _ in 0..60 {
        lag = replica.metric("strata_consumer_lag").await;
        if lag == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        lag,
        Some(0.0),
        "consumer lag per partition is exported and reaches zero"
    );
    replica.stop(Duration::from_secs(30));
    let contents = setup.assert_exact(&produced).await;
    assert_eq!(written as usize, produced.good.len());
    assert_eq!(dead as usize, produced.bad.len());
    // Every rejected record is in the dead-letter topic once, byte for byte, with its reason.
    let letters = common::dead_letters(
        &format!("{}.dlq", setup.topic),
        produced.bad.len(),
        Duration::from_secs(60),
    )
    .await;
    let mut sources: Vec<_> = letters.iter().map(|l| l.source.clone()).collect();
    sources.sort();
    let mut expected = produced.bad.clone();
    expected.sort();
    assert_eq!(
        sources, expected,
        "dead-letter topic holds exactly the rejected offsets"
    );
    for letter in &letters {
        let original = &produced.bad_values[&(letter.source.1, letter.source.2)];
        assert_eq!(
            letter.value.as_ref(),
            Some(original),
            "value kept byte for byte"
        );
        assert!(letter.key.is_some(), "key kept");
        assert!(
            ["bad_magic", "unknown_schema", "decode_error"].contains(&letter.kind.as_str()),
            "{letter:?}"
        );
        assert!(!letter.message.is_empty());
    }
    // A file holds one event hour, so there are at least as many files as hours in the data.
    let mut hours = std::collections::BTreeSet::new();
    for batch in &contents.batches {
        use deltalake::arrow::array::AsArray;
        use deltalake::arrow::datatypes::TimestampMicrosecondType;
        let times = batch
            .column_by_name("event_time")
            .expect("event_time")
            .as_primitive::<TimestampMicrosecondType>();
        hours.extend(
            times
                .values()
                .iter()
                .map(|t| strata::lake::files::date_hour(*t)),
        );
    }
    assert!(
        hours.len() > 1,
        "the generator spreads events over several hours"
    );
    assert!(
        contents.files >= hours.len(),
        "{} files for {} event hours",
        contents.files,
        hours.len()
    );
}

/// SIGKILL after the Parquet upload but before the Delta commit, after the Delta commit but before
/// the group commit, and at a random moment; each time a fresh process resumes from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_commit_step_then_restart_is_exact() {
    let setup = Setup::new("kill", 4).await;
    let produced = produce(&setup.topic, 20_000, 300, 2).await;
    for failpoint in [
        "after_upload:2",
        "after_delta_commit:2",
        "after_upload:1",
        "after_delta_commit:1",
    ] {
        let replica = setup.spawn(&[
            ("STRATA_FAILPOINT", failpoint),
            ("STRATA_FILE_MAX_ROWS", "3000"),
        ]);
        let reached = replica
            .wait_log("STRATA_FAILPOINT_REACHED", Duration::from_secs(120))
            .await;
        assert!(
            reached,
            "failpoint {failpoint} not reached; log:\n{}",
            replica.tail(40)
        );
        replica.sigkill();
        common::outlive_dead_member().await;
    }
    // A kill at an arbitrary moment mid-run.
    let replica = setup.spawn(&[("STRATA_FILE_MAX_ROWS", "2000")]);
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    replica.sigkill();
    common::outlive_dead_member().await;

    let replica = setup.spawn(&[]);
    setup.catch_up(&produced, &[&replica]).await;
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
}

/// Two replicas share the group; one leaves (SIGTERM) mid-run and later rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_leaves_and_rejoins_mid_run_is_exact() {
    let setup = Setup::new("rejoin", 6).await;
    let mut produced = produce(&setup.topic, 15_000, 250, 3).await;
    let a = setup.spawn(&[("STRATA_FILE_MAX_ROWS", "2000")]);
    let b = setup.spawn(&[("STRATA_FILE_MAX_ROWS", "2000")]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    b.stop(Duration::from_secs(40));
    produced.extend(produce(&setup.topic, 10_000, 250, 4).await);
    let b = setup.spawn(&[("STRATA_FILE_MAX_ROWS", "2000")]);
    produced.extend(produce(&setup.topic, 10_000, 250, 5).await);
    setup.catch_up(&produced, &[&a, &b]).await;
    a.stop(Duration::from_secs(40));
    b.stop(Duration::from_secs(40));
    setup.assert_exact(&produced).await;
}

/// A replica frozen (SIGSTOP) between uploading its files and committing them loses its partitions
/// to another replica; when it wakes up, its stale commit is refused and the table stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_replica_cannot_commit_stale_work() {
    let setup = Setup::new("zombie", 2).await;
    let mut produced = produce(&setup.topic, 4_000, 200, 6).await;
    // The zombie stops right before its first commit (the pause only holds it there until the
    // test has frozen the whole process).
    let zombie = setup.spawn(&[
        ("STRATA_FAILPOINT", "before_commit"),
        ("STRATA_FAILPOINT_PAUSE_SECS", "3"),
    ]);
    assert!(
        zombie
            .wait_log(
                "STRATA_FAILPOINT_REACHED before_commit",
                Duration::from_secs(120)
            )
            .await,
        "zombie never reached its commit:\n{}",
        zombie.tail(30)
    );
    zombie.signal("STOP");
    common::outlive_dead_member().await;

    // The survivor takes the partitions once the zombie's session expires, and commits.
    let survivor = setup.spawn(&[]);
    produced.extend(produce(&setup.topic, 2_000, 200, 7).await);
    setup.catch_up(&produced, &[&survivor]).await;
    let version_before = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("table")
        .version;

    // Wake the zombie: it goes straight on to commit its stale files, and must be refused.
    zombie.signal("CONT");
    assert!(
        zombie
            .wait_log("commit refused", Duration::from_secs(60))
            .await,
        "zombie's stale commit was not refused:\n{}",
        zombie.tail(40)
    );
    zombie.stop(Duration::from_secs(40));
    survivor.stop(Duration::from_secs(40));
    let contents = setup.assert_exact(&produced).await;
    assert_eq!(
        contents.version, version_before,
        "the refused zombie changed the table"
    );
}

/// Restarting with no new data commits nothing; with new data it resumes at `txn + 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_commits_nothing_without_new_data_and_resumes_at_txn_plus_one() {
    let setup = Setup::new("restart", 3).await;
    let mut produced = produce(&setup.topic, 6_000, 100, 8).await;
    let replica = setup.spawn(&[]);
    setup.catch_up(&produced, &[&replica]).await;
    replica.stop(Duration::from_secs(30));
    let table = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("table");

    // No new data: the table version must not move.
    let replica = setup.spawn(&[]);
    assert!(
        replica
            .wait_log("\"kind\":\"assign\"", Duration::from_secs(60))
            .await,
        "no assignment:\n{}",
        replica.tail(20)
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The endpoint answers, so an absent counter really means nothing was consumed.
    assert!(replica.metric("strata_build_info").await.is_some());
    let consumed = replica
        .metric("strata_records_consumed_total")
        .await
        .unwrap_or(0.0);
    replica.stop(Duration::from_secs(30));
    let after = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("table");
    assert_eq!(
        after.version, table.version,
        "a restart without data committed something"
    );
    assert_eq!(consumed, 0.0, "a restart without data re-read records");

    // New data: consumption starts exactly at txn + 1 (nothing re-read, nothing skipped).
    let more = produce(&setup.topic, 3_000, 100, 9).await;
    let replica = setup.spawn(&[]);
    produced.extend(more.clone());
    setup.catch_up(&produced, &[&replica]).await;
    let consumed = replica
        .metric("strata_records_consumed_total")
        .await
        .unwrap_or(0.0);
    let duplicates = replica
        .metric("strata_records_skipped_duplicate_total")
        .await
        .unwrap_or(0.0);
    replica.stop(Duration::from_secs(30));
    assert_eq!(
        consumed as usize,
        more.good.len() + more.bad.len(),
        "resumed somewhere else than txn + 1"
    );
    assert_eq!(duplicates, 0.0);
    setup.assert_exact(&produced).await;
}

/// The issue-10 acceptance case: no dead-letter topic exists beforehand (as on clusters that do
/// not create topics on first use); 30,000 good and 25 undecodable records over 6 partitions, and
/// SIGKILLs at random moments. Strata creates `<topic>.dlq` itself (as many partitions as the
/// Bronze topic), every good record is in Silver once, and the 25 bad ones are in the dead-letter
/// topic, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_without_a_dead_letter_topic_survive_sigkills() {
    let setup = Setup::new("nodlq", 6).await;
    let dlq = format!("{}.dlq", setup.topic);
    assert_eq!(
        common::partition_count(&dlq),
        None,
        "no dead-letter topic yet"
    );
    let produced = produce(&setup.topic, 30_025, 1_201, 41).await;
    assert_eq!((produced.good.len(), produced.bad.len()), (30_000, 25));
    let seed = std::process::id() as u64;
    for round in 0..3u64 {
        let replica = setup.spawn(&[("STRATA_FILE_MAX_ROWS", "1500")]);
        // A random moment between the first dead letter and a full catch-up.
        let millis = 1_500 + (seed.wrapping_mul(2_654_435_761).wrapping_add(round * 977)) % 4_000;
        tokio::time::sleep(Duration::from_millis(millis)).await;
        replica.sigkill();
        common::outlive_dead_member().await;
    }
    let replica = setup.spawn(&[]);
    setup.catch_up(&produced, &[&replica]).await;
    // Ready once caught up: nothing holds it (the dead-letter topic exists now). Waited for, not
    // read once: a single read failed in CI (503 right after the catch-up, reason not kept),
    // and a passing moment of a reason (a slow flush on the shared moto) is not what this checks.
    replica
        .wait_ready(Duration::from_secs(30), "not ready after catching up")
        .await;
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;

    assert_eq!(
        common::partition_count(&dlq),
        Some(6),
        "created with the Bronze topic's partition count"
    );
    let letters = common::dead_letters(&dlq, produced.bad.len(), Duration::from_secs(60)).await;
    let sources: std::collections::BTreeSet<_> = letters.iter().map(|l| l.source.clone()).collect();
    let expected: std::collections::BTreeSet<_> = produced.bad.iter().cloned().collect();
    assert_eq!(
        sources, expected,
        "the dead-letter topic holds exactly the bad records"
    );
    // A kill between a dead letter's acknowledgement and the commit of its offset sends it again
    // on replay (the headers say which source offset it is); a kill cannot lose one.
    eprintln!(
        "{} dead letters for {} bad records",
        letters.len(),
        expected.len()
    );
    for letter in &letters {
        let original = &produced.bad_values[&(letter.source.1, letter.source.2)];
        assert_eq!(
            letter.value.as_ref(),
            Some(original),
            "value kept byte for byte"
        );
    }
}
