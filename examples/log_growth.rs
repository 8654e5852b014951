//! How a table's age costs: commit duration and restart-to-ready time (open the table and read a
//! partition's `txn`, what a replica does on assignment) after N commits, with checkpoints every
//! 100 commits and without any. Local disk, debug build: the figures are relative.
//!
//! `cargo run --example log_growth -- 10000 2000` (10,000 commits with checkpoints, 2,000 without:
//! without checkpoints every commit costs more than the one before, so 10,000 would take hours)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deltalake::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use strata::lake::commit::TableCommitter;
use strata::models::TopicPartition;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let commits: i64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    strata::lake::register_object_stores();
    let without: i64 = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(commits);
    for (label, every, commits) in [
        ("checkpoints every 100", Some(100), commits),
        ("no checkpoint", Some(u64::MAX), without),
    ] {
        let dir = tempfile::tempdir()?;
        let url = url::Url::from_directory_path(dir.path()).map_err(|()| "path")?;
        let schema = Schema::new(vec![Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        )]);
        let table = strata::lake::open_or_create(url.clone(), &schema, "bench").await?;
        let mut committer = TableCommitter::new(table, "bench", 50).with_checkpoint_interval(every);
        let tp = TopicPartition::new("orders", 0);
        committer.claim(std::slice::from_ref(&tp)).await?;
        let mut marks = Vec::new();
        let mut window = Vec::new();
        for n in 0..commits {
            let started = Instant::now();
            let last: BTreeMap<TopicPartition, i64> = [(tp.clone(), n)].into_iter().collect();
            committer.commit(Vec::new(), &last).await?;
            window.push(started.elapsed());
            let version = n + 1;
            if [100, 1_000, 5_000, 10_000].contains(&version) || version == commits {
                let mean = window.iter().sum::<Duration>() / window.len().max(1) as u32;
                window.clear();
                let opened = Instant::now();
                let table = deltalake::DeltaTable::try_from_url(url.clone()).await?;
                let stored = table
                    .snapshot()?
                    .transaction_version(table.log_store().as_ref(), "strata/bench/orders/0")
                    .await?;
                assert_eq!(stored, Some(n));
                marks.push((version, mean, opened.elapsed()));
            }
        }
        println!("{label}:");
        for (version, commit, ready) in marks {
            println!(
                "  at commit {version:>6}: commit {:>7.1} ms (mean of the commits before), open + txn lookup {:>7.1} ms",
                commit.as_secs_f64() * 1e3,
                ready.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
