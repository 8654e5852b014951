//! Operators' view on a real broker (tansu), S3 API (moto) and Prometheus server (Debian's
//! package): Prometheus scrapes a running `strata` and a PromQL query returns the records the test
//! produced; the rules load into that server; every metric the rules and the dashboard name is
//! exported, under Prometheus' naming conventions.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{produce, Setup};

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        let binary = std::env::var("STRATA_TEST_PROMETHEUS")
            .expect("STRATA_TEST_PROMETHEUS is not set: run with `make test`");
        let dir = tempfile::tempdir().expect("dir");
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: strata\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
            rules.display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
        let port = common::free_port();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("prometheus.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let text = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The value of an instant query with one result, if it has one.
    async fn query(&self, promql: &str) -> Option<f64> {
        let query: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let answer = self.get(&format!("/api/v1/query?query={query}")).await?;
        let results = answer["data"]["result"].as_array()?;
        results.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Metric names (not recording rules, which contain a colon) mentioned in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("strata_") {
        let start = i + found;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b':');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let followed_by_colon = bytes.get(end) == Some(&b':');
        if !preceded && !followed_by_colon {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_strata_and_every_named_metric_is_exported() {
    let setup = Setup::new("observe", 2).await;
    let produced = produce(&setup.topic, 3_000, 100, 21).await;
    // Gold on, so its metrics are exported (and named by the rules and the dashboard).
    let replica = setup.spawn(&[
        ("STRATA_GOLD_KEY", "customer_id"),
        ("STRATA_GOLD_WINDOW", "15m"),
        ("STRATA_GOLD_AGGREGATES", "count, sum(amount)"),
        ("STRATA_GOLD_PARTITIONS", "4"),
        ("STRATA_HOT_KEY_SALTS", "2"),
    ]);
    setup.catch_up(&produced, &[&replica]).await;

    let prometheus = Prometheus::start(replica.metrics_port);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut written = None;
    while Instant::now() < deadline {
        written = prometheus.query("sum(strata_records_written_total)").await;
        if written == Some(produced.good.len() as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        written,
        Some(produced.good.len() as f64),
        "PromQL sees every record the test produced and Strata wrote"
    );
    assert_eq!(
        prometheus
            .query("sum(strata_records_dead_lettered_total)")
            .await,
        Some(produced.bad.len() as f64)
    );
    assert_eq!(prometheus.query("min(strata_ready)").await, Some(1.0));
    // The rules load into the server and evaluate without error (the recording group runs every
    // 30 s, so the first evaluation can take that long).
    let mut healthy = false;
    let mut unhealthy = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(75);
    while Instant::now() < deadline {
        if let Some(rules) = prometheus.get("/api/v1/rules").await {
            let groups = rules["data"]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            unhealthy = groups
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{} ({}: {})", r["name"], r["health"], r["lastError"]))
                .collect();
            healthy = groups.len() == 2 && unhealthy.is_empty();
            if healthy {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        healthy,
        "the rules load and evaluate in Prometheus; not yet ok: {unhealthy:?}"
    );

    // Every metric named by the rules and the dashboard is exported by the running replica.
    let exposition = reqwest::get(format!("http://127.0.0.1:{}/metrics", replica.metrics_port))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let mut types = std::collections::BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut named = metric_names(
        &std::fs::read_to_string(root.join("deploy/prometheus/rules.yaml")).expect("rules"),
    );
    named.extend(metric_names(
        &std::fs::read_to_string(root.join("deploy/grafana/strata.json")).expect("dashboard"),
    ));
    assert!(named.len() >= 15, "{named:?}");
    for name in &named {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(base),
            "{name} is named in deploy/ but not exported"
        );
    }
    // Naming conventions: a strata_ prefix, _total counters, base units.
    for (name, kind) in &types {
        assert!(name.starts_with("strata_"), "{name}");
        match kind.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds") || name.ends_with("_bytes"),
                "histogram {name} must be in seconds or bytes"
            ),
            _ => assert!(
                !name.ends_with("_total"),
                "{kind} {name} must not end in _total"
            ),
        }
        assert!(
            !name.contains("_ms") && !name.contains("millis"),
            "{name}: base units only"
        );
    }
    // Bounded labels: no series carries a record key or offset.
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("key=") && !line.contains("offset="),
            "{line}"
        );
    }
    replica.stop(Duration::from_secs(30));
}
