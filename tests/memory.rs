//! Silver's memory (tansu + moto, the real binary): with flushes started by the buffer budget
//! (`STRATA_FILE_MAX_BYTES`), the replica's peak RSS over every one of them, up to the last
//! record read, grows over its idle RSS by at most the budget plus 64 MiB. A flush streams each file from the buffered batches to the store (multipart
//! for large files), so it holds no copy of the buffer and no whole file.

mod common;

use std::time::Duration;

use common::{produce, Setup};

/// `VmRSS` or `VmHWM` of a process, in MiB.
fn memory_mib(pid: i32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("memory field")
        / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silver_peak_rss_stays_within_the_buffer_budget_plus_64_mib() {
    const BUDGET_MIB: f64 = 24.0;
    let setup = Setup::new("silver-memory", 3).await;
    let budget = format!("{}", (BUDGET_MIB as usize) * 1024 * 1024);
    let replica = setup.spawn(&[
        ("STRATA_FILE_MAX_BYTES", budget.as_str()),
        ("STRATA_FILE_MAX_ROWS", "10000000"),
        ("STRATA_FLUSH_INTERVAL", "5m"),
    ]);
    replica
        .wait_ready(Duration::from_secs(60), "never ready")
        .await;
    let idle = memory_mib(replica.pid(), "VmRSS:");
    let mut produced = produce(&setup.topic, 150_000, 0, 71).await;
    produced.extend(produce(&setup.topic, 150_000, 0, 72).await);
    // Flushes come from the budget alone (the interval is 5 minutes).
    replica
        .wait_metric(
            "strata_commits_total",
            1.0,
            "no flush started by the budget",
        )
        .await;
    // Every flush the budget starts, up to the last record: the peak of all of them.
    replica
        .wait_metric(
            "strata_records_consumed_total",
            (produced.good.len() + produced.bad.len()) as f64,
            "not every record was read",
        )
        .await;
    let peak = memory_mib(replica.pid(), "VmHWM:");
    let pid = replica.pid();
    // SIGTERM commits what it holds; a replica with the usual flush interval takes the rest, and
    // the table is exact.
    replica.stop(Duration::from_secs(60));
    let next = setup.spawn(&[]);
    setup.catch_up(&produced, &[&next]).await;
    next.stop(Duration::from_secs(30));
    setup.assert_exact(&produced).await;
    let growth = peak - idle;
    eprintln!(
        "Silver with a buffer budget of {BUDGET_MIB} MiB: idle RSS {idle:.0} MiB, peak {peak:.0} MiB \
         (+{growth:.0} MiB) (pid {pid})"
    );
    assert!(
        growth <= BUDGET_MIB + 64.0,
        "peak RSS grew by {growth:.0} MiB over idle, more than the budget {BUDGET_MIB} MiB + 64 MiB"
    );
}
