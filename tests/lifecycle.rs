//! Clean shutdown on a real broker (tansu) and S3 API (moto): SIGTERM in the middle of a busy run
//! exits 0 within the grace period with a table that holds exactly a prefix of every partition, and
//! a rolling restart of every replica while data flows loses and duplicates nothing.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{produce, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_busy_run_exits_cleanly_within_the_grace_period() {
    let setup = Setup::new("sigterm", 3).await;
    let mut produced = produce(&setup.topic, 30_000, 400, 31).await;
    let grace = Duration::from_secs(20);
    let mut env = vec![
        ("STRATA_SHUTDOWN_GRACE", "20s"),
        ("STRATA_FLUSH_INTERVAL", "5s"),
    ];
    env.extend(common::GROUP_DEBUG);
    let replica = setup.spawn(&env);
    replica
        .wait_metric("strata_records_written_total", 1.0, "first commit")
        .await;
    // Producers keep going while the replica is told to stop: it is busy when the signal lands.
    let topic = setup.topic.clone();
    let more = tokio::spawn(async move { produce(&topic, 40_000, 400, 32).await });
    replica
        .wait_metric(
            "strata_records_buffered",
            1_000.0,
            "rows are waiting for a commit when SIGTERM lands",
        )
        .await;
    let before = setup.progress().await;

    let asked = Instant::now();
    let log = replica.log.clone();
    let from = log.lock().expect("log").len();
    replica.stop(grace + Duration::from_secs(5)); // asserts exit status 0
    let took = asked.elapsed();
    assert!(took < grace, "stopped in {took:?}, grace is {grace:?}");
    produced.extend(more.await.expect("producer"));

    // The drain committed what was buffered, and what was committed is exactly a prefix of each
    // partition: all good records up to the stored progress, nothing after it, nothing twice.
    let progress = setup.progress().await;
    assert!(
        progress.values().sum::<i64>() > before.values().sum::<i64>(),
        "the drain committed the buffered rows (before {before:?}, after {progress:?})"
    );
    let prefix = common::Produced {
        good: produced
            .good
            .iter()
            .filter(|(_, p, o)| progress.get(p).is_some_and(|v| o <= v))
            .cloned()
            .collect(),
        values: produced.values.clone(),
        ..Default::default()
    };
    let contents = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("read");
    let lineage = strata::lake::verify::lineage(&contents.batches).expect("lineage");
    let report = strata::lake::verify::exactly_once(lineage, prefix.good.iter().cloned());
    assert!(report.is_exact(), "after SIGTERM: {report}");

    // It left its group, and the next replica finishes the job: exact.
    common::assert_left_group(&log, from, &setup.group).await;
    let replica = setup.spawn(&[]);
    setup.catch_up(&produced, &[&replica]).await;
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_replica_loses_and_duplicates_nothing() {
    let setup = Setup::new("rolling", 4).await;
    let mut produced = produce(&setup.topic, 10_000, 500, 41).await;
    let env = [("STRATA_SHUTDOWN_GRACE", "20s")];
    let mut replicas = vec![setup.spawn(&env), setup.spawn(&env)];
    // Either replica's first commit: the group has settled and work flows.
    let deadline = Instant::now() + common::CATCH_UP;
    while setup.progress().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no commit:\n{}",
            replicas[0].tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Restart each replica in turn, as a rolling update does, while producers keep going.
    let mut stops = BTreeMap::new();
    for round in 0..replicas.len() {
        let batch = produce(&setup.topic, 5_000, 500, 42 + round as u64).await;
        produced.extend(batch);
        let old = replicas.remove(0);
        let asked = Instant::now();
        old.stop(Duration::from_secs(25));
        stops.insert(round, asked.elapsed());
        replicas.push(setup.spawn(&env));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    produced.extend(produce(&setup.topic, 5_000, 500, 50).await);
    let refs: Vec<&common::Replica> = replicas.iter().collect();
    setup.catch_up(&produced, &refs).await;
    for replica in replicas {
        replica.stop(Duration::from_secs(30));
    }
    setup.assert_exact(&produced).await;
    for (round, took) in stops {
        assert!(
            took < Duration::from_secs(20),
            "round {round}: stop took {took:?}"
        );
    }
}

/// A replica that has read every partition to its end commits at once when an interval has
/// passed since its last commit (here since its start), instead of holding the rows for an
/// interval of their own; right after that commit, a trickle waits for the interval as before, so
/// a flush still comes at most about once per interval. The table is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_replica_commits_at_once_an_interval_after_its_last_commit() {
    let setup = Setup::new("caught-up", 2).await;
    let replica = setup.spawn(&[("STRATA_FLUSH_INTERVAL", "10s")]);
    replica
        .wait_metric("strata_assigned_partitions", 2.0, "partitions assigned")
        .await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut produced = produce(&setup.topic, 2_000, 1_000, 65).await;
    let sent = Instant::now();
    // The first commit comes at once, on catching up. It may cover only part of the records: the
    // broker can append one send in more than one burst, and a replica that read the first to
    // its end caught up then; the rest, right after that commit, waits for the interval.
    let deadline = Instant::now() + Duration::from_secs(5);
    while setup.progress().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !setup.progress().await.is_empty(),
        "nothing committed within 5 s of sending, with a 10 s interval; log:\n{}",
        replica.tail(30)
    );
    eprintln!("first commit {:?} after sending", sent.elapsed());
    let early = replica
        .metric("strata_flushes_caught_up_total")
        .await
        .unwrap_or(0.0);
    assert!(early >= 1.0, "flushes started on catching up: {early}");
    assert!(
        setup.wait_for(&produced, Duration::from_secs(20)).await,
        "not all committed within 20 s of sending, with a 10 s interval; log:\n{}",
        replica.tail(30)
    );
    eprintln!("all committed {:?} after sending", sent.elapsed());

    // A trickle right after that commit: read, and held for the interval.
    let before = setup.progress().await;
    let trickle = produce(&setup.topic, 50, 1_000, 66).await;
    let sent = Instant::now();
    replica
        .wait_metric(
            "strata_records_consumed_total",
            2_050.0,
            "the trickle was read",
        )
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        setup.progress().await,
        before,
        "the trickle waits for the interval after the last commit"
    );
    produced.extend(trickle);
    assert!(
        setup.wait_for(&produced, Duration::from_secs(20)).await,
        "the trickle was not committed after the interval; log:\n{}",
        replica.tail(30)
    );
    eprintln!("trickle committed {:?} after sending", sent.elapsed());
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
}

/// A replica the group gives no partition (more replicas than partitions) is still ready: a
/// readiness probe that never passed would block rolling updates of the whole Deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_partitions_is_ready() {
    let setup = Setup::new("idle", 1).await;
    let produced = produce(&setup.topic, 1_000, 500, 51).await;
    let first = setup.spawn(&[]);
    setup.catch_up(&produced, &[&first]).await;
    let second = setup.spawn(&[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut statuses = (0, 0);
    while Instant::now() < deadline {
        let ready = |port: u16| async move {
            match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
                Ok(answer) => answer.status().as_u16(),
                Err(_) => 0, // not listening yet
            }
        };
        statuses = (
            ready(first.metrics_port).await,
            ready(second.metrics_port).await,
        );
        if statuses == (200, 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(statuses, (200, 200), "{}", second.tail(30));
    let assigned = first
        .metric("strata_assigned_partitions")
        .await
        .unwrap_or(0.0)
        + second
            .metric("strata_assigned_partitions")
            .await
            .unwrap_or(0.0);
    assert_eq!(assigned, 1.0, "one partition between the two");
    first.stop(Duration::from_secs(30));
    second.stop(Duration::from_secs(30));
}

/// A dead-letter topic the cluster refuses to create (CreateTopics answered with
/// TOPIC_AUTHORIZATION_FAILED, as for a principal without the CREATE ACL): the replica stays up but
/// not ready, naming the topic and the permission; it counts the failed writes; nothing commits
/// past a bad record; SIGTERM still stops it at once. When an operator then grants the permission,
/// the replica creates the topic and resumes by itself, and the table and the dead letters are
/// exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_that_cannot_be_created_is_visible_and_bounded() {
    let broker = common::acl_proxy::RefusingBroker::start().await;
    // The Bronze topic exists, as the platform made it; Strata talks through the refusing proxy.
    let mut setup = Setup::on(&broker.direct, "dlqrefused", 2).await;
    setup.brokers = broker.brokers.clone();
    broker.revoke_create();
    let dlq = format!("{}.dlq", setup.topic);
    let produced = common::produce_on(&broker.direct, &setup.topic, 3_000, 250, 51).await;
    let first_bad: BTreeMap<i32, i64> = produced.bad.iter().fold(BTreeMap::new(), |mut m, b| {
        let slot = m.entry(b.1).or_insert(b.2);
        *slot = (*slot).min(b.2);
        m
    });
    assert!(!first_bad.is_empty());
    let env = [
        ("STRATA_SHUTDOWN_GRACE", "30s"),
        // librdkafka fails a message for a missing topic after this long (30 s by default).
        ("STRATA_KAFKA_TOPIC_METADATA_PROPAGATION_MAX_MS", "2000"),
    ];
    let replica = setup.spawn(&env);
    assert!(
        replica
            .wait_log("not allowed to create topic", Duration::from_secs(60))
            .await,
        "the refusal is not reported:\n{}",
        replica.tail(30)
    );
    assert!(
        replica.log_contains("CREATE on the topic or the cluster"),
        "the log names the permission:\n{}",
        replica.tail(30)
    );
    // Not ready, naming the topic.
    let readyz = reqwest::get(format!("http://127.0.0.1:{}/readyz", replica.metrics_port))
        .await
        .expect("readyz");
    assert_eq!(readyz.status().as_u16(), 503);
    let body = readyz.text().await.expect("body");
    assert!(body.contains(&dlq), "{body}");
    assert_eq!(
        replica
            .metric_where(
                "strata_dead_letter_topic_blocked",
                &format!("topic=\"{dlq}\"")
            )
            .await,
        Some(1.0)
    );
    replica
        .wait_metric(
            "strata_dead_letter_write_failures_total",
            1.0,
            "a failed dead-letter write counted",
        )
        .await;
    assert_eq!(
        common::partition_count_on(&broker.direct, &dlq),
        None,
        "nothing created the topic"
    );
    // Nothing is committed at or past a partition's first bad record.
    let progress = setup.progress().await;
    for (partition, bad) in &first_bad {
        assert!(
            progress.get(partition).is_none_or(|v| v < bad),
            "partition {partition} committed {progress:?} past its bad record at {bad}"
        );
    }
    // SIGTERM ends the retries at once: far inside the 30 s grace.
    let asked = Instant::now();
    replica.stop(Duration::from_secs(15));
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "took {:?}",
        asked.elapsed()
    );

    // An operator grants CREATE: the replica makes the topic by itself, and everything lands once.
    let replica = setup.spawn(&env);
    assert!(
        replica
            .wait_log("not allowed to create topic", Duration::from_secs(60))
            .await
    );
    broker.grant_create();
    setup.catch_up(&produced, &[&replica]).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while replica.http_status("/readyz").await != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready:\n{}",
            replica.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        replica
            .metric_where(
                "strata_dead_letter_topic_blocked",
                &format!("topic=\"{dlq}\"")
            )
            .await,
        Some(0.0)
    );
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
    let letters = common::dead_letters_on(
        &broker.direct,
        &dlq,
        produced.bad.len(),
        Duration::from_secs(60),
    )
    .await;
    let mut sources: Vec<_> = letters.iter().map(|l| l.source.clone()).collect();
    sources.sort();
    let mut expected = produced.bad.clone();
    expected.sort();
    assert_eq!(sources, expected, "every bad record dead-lettered once");
}

/// A replica frozen past its session loses its assignment of several partitions at once. When it
/// wakes, it drops their buffered rows as `lost`, each partition's rows counted once, so its own
/// accounting identity holds (consumed = written + dead-lettered + skipped + dropped + buffered),
/// and the survivor's table is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_of_several_partitions_keeps_the_accounting_identity() {
    let setup = Setup::new("lost", 3).await;
    let produced = produce(&setup.topic, 6_000, 300, 61).await;
    let zombie = setup.spawn(&[
        ("STRATA_FLUSH_INTERVAL", "10m"),
        ("STRATA_FILE_MAX_ROWS", "1000000"),
    ]);
    zombie
        .wait_metric(
            "strata_records_buffered",
            produced.good.len() as f64,
            "every good row buffered, none committed",
        )
        .await;
    zombie.signal("STOP");
    common::outlive_dead_member().await;
    let survivor = setup.spawn(&[]);
    setup.catch_up(&produced, &[&survivor]).await;
    zombie.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let lost = zombie
            .metric_where("strata_records_dropped_total", "reason=\"lost\"")
            .await
            .unwrap_or(0.0);
        if lost > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen replica never dropped a lost assignment:\n{}",
            zombie.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Several partitions were lost at once, and the rows dropped are exactly those buffered.
    let lost = zombie
        .metric_where("strata_records_dropped_total", "reason=\"lost\"")
        .await
        .unwrap_or(0.0);
    assert_eq!(
        lost,
        produced.good.len() as f64,
        "each lost partition's rows are counted once"
    );
    common::assert_accounting(&zombie).await;
    zombie.stop(Duration::from_secs(40));
    survivor.stop(Duration::from_secs(40));
    setup.assert_exact(&produced).await;
}

/// A bad record larger than librdkafka's default 1 MB message limit still reaches the dead-letter
/// topic byte for byte (the producer's limit is raised, the topic takes what the Bronze topic
/// takes), instead of blocking its partition for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_larger_than_a_megabyte_passes() {
    let setup = Setup::new("bigletter", 1).await;
    let big: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let offsets = common::produce_raw(&setup.topic, vec![(Some(b"k".to_vec()), big.clone())]).await;
    let replica = setup.spawn(&[]);
    let letters =
        common::dead_letters(&format!("{}.dlq", setup.topic), 1, Duration::from_secs(90)).await;
    assert_eq!(letters.len(), 1, "log:\n{}", replica.tail(20));
    assert_eq!(letters[0].source.2, offsets[0]);
    assert_eq!(
        letters[0].value.as_deref(),
        Some(big.as_slice()),
        "byte for byte"
    );
    assert_eq!(letters[0].kind, "bad_magic");
    assert_eq!(replica.http_status("/readyz").await, 200);
    replica.stop(Duration::from_secs(30));
}
