//! The lag an autoscaler sees (tansu + moto, the real binary). KEDA's Kafka trigger reads the
//! consumer group's committed offsets. Strata commits each partition's consumed position to the
//! group every second (advisory: the table says where a partition resumes), so at a steady load
//! under capacity the group's lag stays near one second of records, not a flush interval's worth,
//! and the shipped ScaledObject asks for no more replicas than the load needs. What is consumed
//! and not yet in the table is reported apart, as `strata_durable_lag`.

mod common;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use common::{produce, Setup};

/// Records per second produced, spread over the partitions: well under one replica's capacity.
const RATE: u64 = 1_500;
const PARTITIONS: i32 = 3;

/// `lagThreshold` and `minReplicaCount` of the shipped ScaledObject.
fn shipped_scaling() -> (u64, u64) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/k8s/base/scaledobject.yaml"
    );
    let text = std::fs::read_to_string(path).expect("scaledobject.yaml");
    let value = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().trim_matches('"').parse().expect("a number"))
            .unwrap_or_else(|| panic!("{key} not in {path}"))
    };
    (value("lagThreshold:"), value("minReplicaCount:"))
}

/// The group's lag as KEDA computes it: per partition, the end offset minus the committed offset.
fn group_lag(setup: &Setup) -> Option<i64> {
    let consumer: BaseConsumer = common::client_config(&setup.brokers, &[])
        .set("group.id", &setup.group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        tpl.add_partition(&setup.topic, partition);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(5))
        .ok()?;
    let mut lag = 0;
    for element in committed.elements() {
        let (_, end) = consumer
            .fetch_watermarks(&setup.topic, element.partition(), Duration::from_secs(5))
            .ok()?;
        let Offset::Offset(at) = element.offset() else {
            return None;
        };
        lag += end - at;
    }
    Some(lag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_steady_load_the_group_lag_asks_for_no_extra_replicas() {
    let setup = Setup::new("autoscaling", PARTITIONS).await;
    let flush_interval = Duration::from_secs(10);
    let replica = setup.spawn(&[("STRATA_FLUSH_INTERVAL", "10s")]);
    let mut produced = produce(&setup.topic, RATE, 0, 500).await;
    setup.catch_up(&produced, &[&replica]).await;

    let mut group_lags = Vec::new();
    let mut durable_lags = Vec::new();
    for second in 0..25u64 {
        let started = Instant::now();
        produced.extend(produce(&setup.topic, RATE, 0, 501 + second).await);
        // After a warm-up of a few seconds, the steady state is sampled once a second.
        if second >= 5 {
            if let Some(lag) = group_lag(&setup) {
                group_lags.push(lag);
            }
            if let Some(lag) = replica.metric("strata_durable_lag").await {
                durable_lags.push(lag as i64);
            }
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    }
    setup.catch_up(&produced, &[&replica]).await;
    setup.assert_exact(&produced).await;

    let max_group = group_lags.iter().copied().max().expect("group lag sampled");
    let max_durable = durable_lags
        .iter()
        .copied()
        .max()
        .expect("durable lag sampled");
    let (threshold, min_replicas) = shipped_scaling();
    // KEDA asks for ceil(lag / lagThreshold) replicas, at least minReplicaCount.
    let asked = (max_group as u64).div_ceil(threshold).max(min_replicas);
    eprintln!(
        "steady load of {RATE} records/s: group lag at most {max_group} (samples {group_lags:?}), \
         durable lag at most {max_durable}; KEDA asks for {asked} replicas"
    );
    // One replica carries this load; the group lag stays near a second of records (the commit
    // cadence plus a produce batch), far below the flush interval's worth.
    let flush_worth = RATE as i64 * flush_interval.as_secs() as i64;
    assert!(
        max_group <= 3 * RATE as i64,
        "the group lag follows the flush interval: {group_lags:?} (a flush interval is \
         {flush_worth} records)"
    );
    assert_eq!(asked, min_replicas, "KEDA would ask for extra replicas");
    // The durable lag does see the flush interval: it is the one to alert on for replays.
    assert!(
        max_durable > 3 * RATE as i64,
        "strata_durable_lag never showed the records waiting for a flush: {durable_lags:?}"
    );
    replica.stop(Duration::from_secs(30));
}
