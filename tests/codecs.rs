//! Every compression codec a producer may choose, read by the librdkafka Strata links: records
//! produced with gzip, snappy, lz4 and zstd land in Silver exactly once (in-process replica,
//! librdkafka's MockCluster, a local lake). A fast test: no services needed.
//!
//! The security suite (`tests/security.rs`) reads gzip, lz4 and zstd from tansu over SASL_SSL;
//! snappy is read here only, because tansu 0.6.0 accepts snappy batches but fails to serve them
//! (its fetch answers `UnexpectedType("Snappy")` and drops the connection).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use strata::config::Config;
use strata::demo::{OrderGenerator, ORDER_READER, ORDER_V1, ORDER_V2};
use strata::lake::verify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_compressed_with_every_codec_land_exactly_once() {
    let dir = tempfile::tempdir().expect("dir");
    let schemas = dir.path().join("schemas");
    std::fs::create_dir_all(&schemas).expect("mkdir");
    std::fs::write(schemas.join("1.avsc"), ORDER_V1).expect("write");
    std::fs::write(schemas.join("2.avsc"), ORDER_V2).expect("write");
    let reader = dir.path().join("order.avsc");
    std::fs::write(&reader, ORDER_READER).expect("write");
    let lake = dir.path().join("lake");
    std::fs::create_dir_all(&lake).expect("mkdir");
    let lake_url = format!("file://{}", lake.display());

    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = "codecs";
    cluster.create_topic(topic, 4, 1).expect("topic");
    // The MockCluster has no CreateTopics handler (DESIGN.md).
    cluster.create_topic("codecs.dlq", 4, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();

    let mut expected = Vec::new();
    let mut last_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    for (seed, codec) in ["gzip", "snappy", "lz4", "zstd"].into_iter().enumerate() {
        let properties = [
            ("compression.type".to_string(), codec.to_string()),
            ("linger.ms".to_string(), "50".to_string()),
        ];
        let generator = OrderGenerator::new(seed as u64, 0).expect("generator");
        let produced =
            strata::demo::produce_generated_with(&brokers, &properties, topic, 500, generator)
                .await
                .expect("produce");
        for record in produced.records {
            let slot = last_offsets.entry(record.partition).or_insert(-1);
            *slot = (*slot).max(record.offset);
            expected.push(record.position());
        }
    }

    let vars = strata::demo::replica_vars(
        &brokers,
        "codecs",
        topic,
        &schemas,
        &reader,
        &lake_url,
        &[("STRATA_FLUSH_INTERVAL", "500ms")],
    );
    let config = Config::from_vars(vars).expect("config");
    let run =
        strata::demo::run_until_caught_up(config, topic, &last_offsets, Duration::from_secs(120))
            .await
            .expect("run");
    assert!(run.caught_up, "the replica did not catch up");
    let url = strata::lake::table_url(&lake_url, "silver", "order").expect("url");
    let contents = verify::read_table(url).await.expect("read");
    let report = verify::exactly_once(
        verify::lineage(&contents.batches).expect("lineage"),
        expected,
    );
    assert!(report.is_exact(), "{report}");
    assert_eq!(report.found, 2_000);
}
