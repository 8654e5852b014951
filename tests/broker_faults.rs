//! Faults of the Kafka cluster (a private tansu, the real binary): the broker SIGKILLed mid-run
//! and started again on the same data. The replica is not ready while the broker is away, stays
//! up (no crash loop), and afterwards every Bronze record is once in Silver or once in the
//! dead-letter topic. A replica told to stop while the broker is away exits cleanly within its
//! grace.

mod common;

use std::time::{Duration, Instant};

use common::broker::PrivateBroker;
use common::{produce_on, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_mid_run_costs_nothing() {
    let mut broker = PrivateBroker::start().await;
    let setup = Setup::on(&broker.brokers, "broker-restart", 3).await;
    let mut produced = produce_on(&broker.brokers, &setup.topic, 6_000, 100, 61).await;
    let mut replica = setup.spawn(&[]);
    // Mid-run: part of the records are in the table.
    replica
        .wait_metric("strata_records_written_total", 1.0, "nothing committed")
        .await;
    assert_eq!(
        replica.http_status("/readyz").await,
        200,
        "not ready before the fault"
    );

    broker.kill();
    let killed = Instant::now();
    let mut named = None;
    while killed.elapsed() < Duration::from_secs(60) && named.is_none() {
        if let Some((503, body)) = replica.http_get("/readyz").await {
            if body.contains("kafka") {
                named = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let named = named.unwrap_or_else(|| {
        panic!(
            "/readyz did not say the broker is away:\n{}",
            replica.tail(30)
        )
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(replica.is_running(), "the replica died with the broker");

    broker.restart().await;
    let back = Instant::now();
    produced.extend(produce_on(&broker.brokers, &setup.topic, 4_000, 100, 62).await);
    setup.catch_up(&produced, &[&replica]).await;
    let caught_up = back.elapsed();
    replica
        .wait_ready(
            Duration::from_secs(60),
            "not ready after the broker came back",
        )
        .await;
    eprintln!(
        "broker away {:?}: not ready after {named:?}; caught up {caught_up:?} after it came back",
        back - killed
    );
    assert!(replica.is_running());
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
    common::assert_dead_letters_are(&broker.brokers, &format!("{}.dlq", setup.topic), &produced)
        .await;
}

/// SIGTERM after the broker has been away for 5 s (the replica knows it: `/readyz` names Kafka):
/// the replica cannot leave its group, and still exits cleanly (status 0) within its shutdown
/// grace (`STRATA_SHUTDOWN_GRACE`, 30 s; the deploy kit's pod allows 45 s), with every record it
/// consumed in Silver once. (The broker is not restarted for a second replica: tansu keeps the
/// member that could not leave in its group after a restart, and assigned a new one nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stops_cleanly_while_the_broker_is_away() {
    let mut broker = PrivateBroker::start().await;
    let setup = Setup::on(&broker.brokers, "broker-away-stop", 3).await;
    let produced = produce_on(&broker.brokers, &setup.topic, 6_000, 100, 63).await;
    let replica = setup.spawn(&[]);
    setup.catch_up(&produced, &[&replica]).await;
    broker.kill();
    let killed = Instant::now();
    loop {
        if let Some((503, body)) = replica.http_get("/readyz").await {
            if body.contains("kafka") {
                break;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "/readyz did not say the broker is away:\n{}",
            replica.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let asked = Instant::now();
    replica.stop(Duration::from_secs(30));
    eprintln!(
        "stopped {:?} after SIGTERM, the broker away for {:?}",
        asked.elapsed(),
        asked - killed
    );
    setup.assert_exact(&produced).await;
}
