//! A compressed month on tansu + moto: a flush every 300 ms makes dozens of commits in a minute.
//! Checkpoints are written, a SIGKILL between upload and commit leaves files no version
//! references, another SIGKILL lands in the middle of a compaction, quiet hour partitions are
//! compacted to one file each, and maintenance (inside the
//! replica, and `strata maintain`) vacuums the unreferenced files after a short retention, while
//! every Bronze offset stays in Silver exactly once, with its values. And two maintenance passes
//! that compact the same files at once: one gives way.

mod common;

use strata::lake::verify::PartitionFiles;

/// Files and bytes per hour partition, summarised for the log: how many partitions, the
/// largest file count, and the mean bytes per file.
fn per_hour(partitions: &std::collections::BTreeMap<String, PartitionFiles>) -> String {
    let files: usize = partitions.values().map(|p| p.files).sum();
    let bytes: u64 = partitions.values().map(|p| p.bytes).sum();
    format!(
        "{} hour partitions, {files} files ({} at most in one), {bytes} bytes, {} bytes per file",
        partitions.len(),
        partitions.values().map(|p| p.files).max().unwrap_or(0),
        bytes / files.max(1) as u64
    )
}

use std::time::{Duration, Instant};

use common::{produce, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_month_checkpoints_and_vacuums_and_stays_exact() {
    let setup = Setup::new("month", 3).await;
    let mut produced = produce(&setup.topic, 3_000, 400, 71).await;
    let month = [
        ("STRATA_FLUSH_INTERVAL", "300ms"),
        ("STRATA_FILE_MAX_ROWS", "150"),
        ("STRATA_CHECKPOINT_INTERVAL", "10"),
        ("STRATA_COMMIT_RETRIES", "5"),
        ("STRATA_VACUUM_RETENTION", "60s"),
        ("STRATA_MAINTENANCE_INTERVAL", "3s"),
        ("STRATA_COMPACT_QUIET_FOR", "5s"),
    ];
    // A crash right after an upload: its files are never committed.
    let mut crashing = month.to_vec();
    crashing.push(("STRATA_FAILPOINT", "after_upload:3"));
    let replica = setup.spawn(&crashing);
    assert!(
        replica
            .wait_log("STRATA_FAILPOINT_REACHED", Duration::from_secs(120))
            .await,
        "failpoint not reached:\n{}",
        replica.tail(30)
    );
    replica.sigkill();
    common::outlive_dead_member().await;
    let orphans = strata::lake::verify::unreferenced_files(setup.table_url())
        .await
        .expect("list");
    assert!(!orphans.is_empty(), "the crash left no unreferenced file");

    // This replica is SIGKILLed in the middle of its first compaction (new file uploaded, the
    // remove + add not committed yet).
    let mut compaction_crash = month.to_vec();
    compaction_crash.push(("STRATA_FAILPOINT", "after_compaction_upload:1"));
    let replica = setup.spawn(&compaction_crash);
    // Producers trickle on: every small batch becomes a commit of its own.
    for round in 0..40u64 {
        produced.extend(produce(&setup.topic, 150, 400, 100 + round).await);
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    setup.catch_up(&produced, &[&replica]).await;
    assert!(
        replica
            .wait_log(
                "STRATA_FAILPOINT_REACHED after_compaction_upload",
                Duration::from_secs(90)
            )
            .await,
        "no compaction started:\n{}",
        replica.tail(30)
    );
    replica.sigkill();
    common::outlive_dead_member().await;
    setup.assert_exact(&produced).await;
    let replica = setup.spawn(&month);
    let commits = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("table")
        .version;
    assert!(commits >= 30, "{commits} commits");
    let checkpoint = strata::lake::verify::last_checkpoint(setup.table_url())
        .await
        .expect("checkpoint hint");
    assert!(
        checkpoint.is_some_and(|v| v >= 9),
        "no checkpoint after {commits} commits: {checkpoint:?}"
    );

    let before = strata::lake::verify::files_per_partition(setup.table_url())
        .await
        .expect("files");
    eprintln!("before compaction: {}", per_hour(&before));
    assert!(
        before.values().any(|p| p.files > 1),
        "nothing to compact: {before:?}"
    );
    // Quiet partitions are compacted to one file each; after the retention, maintenance (the
    // replica owns partition 0) removes the crash's orphans and the compacted-away files.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = strata::lake::verify::unreferenced_files(setup.table_url())
            .await
            .expect("list");
        let files = strata::lake::verify::files_per_partition(setup.table_url())
            .await
            .expect("files");
        if left.is_empty() && files.values().all(|p| p.files == 1) {
            eprintln!("after compaction: {}", per_hour(&files));
            // The same bytes of rows, in fewer files (Parquet overhead aside).
            let total = |m: &std::collections::BTreeMap<String, PartitionFiles>| -> u64 {
                m.values().map(|p| p.bytes).sum()
            };
            assert!(total(&files) <= total(&before), "compaction grew the table");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} unreferenced files left after the retention, files per partition {files:?}\n{}",
            left.len(),
            replica.tail(20)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let vacuumed = replica
        .metric_where("strata_maintenance_total", "action=\"files_vacuumed\"")
        .await
        .unwrap_or(0.0);
    assert!(vacuumed >= orphans.len() as f64, "vacuumed {vacuumed}");
    let compacted = replica
        .metric_where("strata_maintenance_total", "action=\"files_compacted\"")
        .await
        .unwrap_or(0.0);
    assert!(compacted >= 2.0, "compacted {compacted}");
    replica.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
    // Python's deltalake reads the checkpointed, compacted, vacuumed table: every row once.
    let (rows, distinct, files) = common::read_with_python(&setup.table_url());
    assert_eq!(
        (rows, distinct),
        (produced.good.len() as u64, produced.good.len() as u64),
        "deltalake (Python) sees every row once ({files} files)"
    );

    // `strata maintain`: one pass over every table of the lake, then exit 0.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("maintain")
        .envs(setup.env(common::free_port()))
        .envs(month.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("strata maintain");
    assert!(status.success(), "strata maintain failed: {status}");
    setup.assert_exact(&produced).await;
}

/// Two maintenance passes compact the same files at once (the maintainer changes hands in a
/// rebalance mid-pass, or `strata maintain` runs beside the replicas), on moto: the first plans
/// and uploads its compacted file, then stalls (a failpoint, until the test resumes it); the
/// second compacts the same files and commits; the first, resumed, must give way. Every row stays
/// in Silver once. Before, delta-rs's conflict checker let the second `remove` without data change
/// through, both compactions landed and the rows were in the table twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_maintainers_at_once_never_compact_the_same_files_twice() {
    let setup = Setup::new("two-maintainers", 2).await;
    let small_files = [
        ("STRATA_FLUSH_INTERVAL", "300ms"),
        ("STRATA_MAINTENANCE_INTERVAL", "1h"),
    ];
    let replica = setup.spawn(&small_files);
    let mut produced = produce(&setup.topic, 200, 50, 5).await;
    // Small batches, each its own commit: several small files per hour partition.
    for round in 0..6u64 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        produced.extend(produce(&setup.topic, 100, 50, 200 + round).await);
    }
    setup.catch_up(&produced, &[&replica]).await;
    replica.stop(Duration::from_secs(30));
    let before = strata::lake::verify::files_per_partition(setup.table_url())
        .await
        .expect("files");
    assert!(
        before.values().any(|p| p.files > 1),
        "nothing to compact: {before:?}"
    );

    let quiet = [("STRATA_COMPACT_QUIET_FOR", "1s")];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resume = tempfile::tempdir().expect("dir");
    let resume_file = resume.path().join("resume");
    let resume_text = resume_file.display().to_string();
    let stalled_env = [
        quiet.as_slice(),
        &[
            ("STRATA_FAILPOINT", "after_compaction_upload:1"),
            ("STRATA_FAILPOINT_RESUME_FILE", resume_text.as_str()),
        ],
    ]
    .concat();
    let mut stalled = setup.spawn_command("maintain", &stalled_env);
    assert!(
        stalled
            .wait_log(
                "STRATA_FAILPOINT_REACHED after_compaction_upload",
                Duration::from_secs(60)
            )
            .await,
        "the first pass did not reach its compaction:\n{}",
        stalled.tail(30)
    );
    let mut second = setup.spawn_command("maintain", &quiet);
    let status = second.exited(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the second pass failed ({status:?}):\n{}",
        second.tail(30)
    );
    let compacted = strata::lake::verify::files_per_partition(setup.table_url())
        .await
        .expect("files");
    assert!(
        compacted.values().all(|p| p.files == 1),
        "the second pass compacted every partition: {compacted:?}"
    );
    std::fs::write(&resume_file, b"").expect("resume the stalled pass");
    let status = stalled.exited(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the stalled pass failed ({status:?}):\n{}",
        stalled.tail(30)
    );
    setup.assert_exact(&produced).await;
    let after = strata::lake::verify::files_per_partition(setup.table_url())
        .await
        .expect("files");
    assert_eq!(after, compacted, "the stalled pass changed the table");
    assert!(
        stalled.log_contains("compaction gave way: another commit removed or changed"),
        "the stalled pass did not give way:\n{}",
        stalled.tail(30)
    );
}
