//! The commit protocol on the real S3 API (moto), driven directly: a replica that lost a partition
//! cannot commit its stale work, and a race for the same partition has exactly one winner.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use strata::config::Compression;
use strata::demo::{OrderGenerator, ORDER_V1, ORDER_V2};
use strata::lake::commit::{Checked, CommitOutcome, TableCommitter};
use strata::lake::files::{FilePolicy, SilverWriter};
use strata::models::{SourceRecord, TopicPartition};
use strata::silver::decode::BatchDecoder;

const READER: &str = include_str!("../schemas/order.avsc");

fn records(topic: &str, partition: i32, offsets: std::ops::Range<i64>) -> Vec<SourceRecord> {
    let mut generator = OrderGenerator::new(offsets.start as u64, 1).expect("generator");
    offsets
        .map(|offset| SourceRecord {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: Some(0),
            key: None,
            value: Some(generator.next_record().expect("record").value.into()),
            headers: Vec::new(),
        })
        .collect()
}

async fn open(
    url: &url::Url,
    decoder: &BatchDecoder,
    group: &str,
) -> (TableCommitter, SilverWriter) {
    let table = strata::lake::open_or_create(url.clone(), &decoder.output_schema(), "order")
        .await
        .expect("table");
    let writer = SilverWriter::new(
        decoder.output_schema(),
        "event_time",
        FilePolicy {
            max_rows: 1_000_000,
            max_bytes: 1 << 30,
            compression: Compression::Zstd,
            delta_encoding: true,
        },
        table.object_store(),
    );
    (TableCommitter::new(table, group, 20), writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_owner_is_refused_and_the_table_keeps_only_the_new_owners_rows() {
    strata::lake::register_object_stores();
    let lake = format!("s3://{}/{}", common::bucket(), common::unique("fence"));
    let url = strata::lake::table_url(&lake, "silver", "order").expect("url");
    let mut decoder = BatchDecoder::new(READER, "event_time", 1024).expect("decoder");
    decoder.register(1, Ok(ORDER_V1));
    decoder.register(2, Ok(ORDER_V2));
    let tp = TopicPartition::new("orders", 0);

    // The zombie claimed the partition first and buffered offsets 0..100.
    let (mut zombie, zombie_writer) = open(&url, &decoder, "g").await;
    assert_eq!(
        zombie
            .claim(std::slice::from_ref(&tp))
            .await
            .expect("claim"),
        vec![(tp.clone(), None)]
    );
    let zombie_rows = decoder
        .decode(&records("orders", 0, 0..100))
        .batch
        .expect("rows");

    // Meanwhile the partition moved to a new owner, which committed offsets 0..150.
    let (mut owner, owner_writer) = open(&url, &decoder, "g").await;
    owner.claim(std::slice::from_ref(&tp)).await.expect("claim");
    let owner_rows = decoder
        .decode(&records("orders", 0, 0..150))
        .batch
        .expect("rows");
    let files = owner_writer.write(&[owner_rows]).await.expect("write");
    let outcome = owner
        .commit(files, &BTreeMap::from([(tp.clone(), 149)]))
        .await
        .expect("commit");
    assert!(
        matches!(outcome, CommitOutcome::Committed { .. }),
        "{outcome:?}"
    );

    // The zombie's check and its commit are both refused, naming what it expected and what is stored.
    let checked = zombie
        .check(&BTreeMap::from([(tp.clone(), 99)]))
        .await
        .expect("check");
    let Checked::Fenced(fenced) = checked else {
        panic!("the zombie's check passed: {checked:?}");
    };
    assert_eq!(fenced.len(), 1);
    assert_eq!((fenced[0].expected, fenced[0].stored), (None, Some(149)));
    assert!(!fenced[0].own_commit);
    let files = zombie_writer.write(&[zombie_rows]).await.expect("write");
    let outcome = zombie
        .commit(files, &BTreeMap::from([(tp.clone(), 99)]))
        .await
        .expect("commit call");
    match outcome {
        CommitOutcome::Fenced(fenced) => assert_eq!(fenced[0].stored, Some(149)),
        other => panic!("stale commit was not refused: {other:?}"),
    }

    let contents = strata::lake::verify::read_table(url).await.expect("read");
    let expected = (0..150).map(|o| ("orders".to_string(), 0, o));
    let report = strata::lake::verify::exactly_once(
        strata::lake::verify::lineage(&contents.batches).expect("lineage"),
        expected,
    );
    assert!(report.is_exact(), "{report}");
}

/// Two committers that both believe they own a partition race; exactly one commit wins, the other
/// is fenced, and the stored progress is the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_for_one_partition_have_one_winner() {
    strata::lake::register_object_stores();
    let lake = format!("s3://{}/{}", common::bucket(), common::unique("race"));
    let url = strata::lake::table_url(&lake, "silver", "order").expect("url");
    let mut decoder = BatchDecoder::new(READER, "event_time", 1024).expect("decoder");
    decoder.register(1, Ok(ORDER_V1));
    decoder.register(2, Ok(ORDER_V2));
    let tp = TopicPartition::new("orders", 1);
    let rows = Arc::new(
        decoder
            .decode(&records("orders", 1, 0..50))
            .batch
            .expect("rows"),
    );

    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (mut committer, writer) = open(&url, &decoder, "g").await;
        committer
            .claim(std::slice::from_ref(&tp))
            .await
            .expect("claim");
        let rows = rows.clone();
        let tp = tp.clone();
        tasks.push(tokio::spawn(async move {
            let files = writer.write(&[(*rows).clone()]).await.expect("write");
            committer
                .commit(files, &BTreeMap::from([(tp, 49)]))
                .await
                .expect("commit call")
        }));
    }
    let mut committed = 0;
    let mut fenced = 0;
    for task in tasks {
        match task.await.expect("task") {
            CommitOutcome::Committed { .. } => committed += 1,
            CommitOutcome::Fenced(_) => fenced += 1,
        }
    }
    assert_eq!((committed, fenced), (1, 1));
    let contents = strata::lake::verify::read_table(url).await.expect("read");
    let expected = (0..50).map(|o| ("orders".to_string(), 1, o));
    let report = strata::lake::verify::exactly_once(
        strata::lake::verify::lineage(&contents.batches).expect("lineage"),
        expected,
    );
    assert!(report.is_exact(), "{report}");
}
