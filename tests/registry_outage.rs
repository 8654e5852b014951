//! A Schema Registry outage is waited out, never blamed on records: the replica reports not ready,
//! dead-letters nothing while the registry is away, and once it is back every record lands exactly
//! once. The registry is a small server replaying Confluent's documented answers.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{produce, Setup};
use strata::demo::{ORDER_V1, ORDER_V2};

fn schema_answer(schema: &str) -> String {
    serde_json::json!({ "schema": schema }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_loses_nothing_and_dead_letters_nothing() {
    let setup = Setup::new("outage", 3).await;
    let produced = produce(&setup.topic, 4_000, 100, 11).await;

    // The registry is down (503) until `up` is set.
    let up = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let serving = up.clone();
    let handler: common::Handler = Arc::new(move |path: &str, _request: &str| {
        if !serving.load(Ordering::SeqCst) {
            return (503, r#"{"error_code": 50003, "message": "Error while forwarding the request to the leader"}"#.to_string());
        }
        match path {
            "/schemas/ids/1" => (200, schema_answer(ORDER_V1)),
            "/schemas/ids/2" => (200, schema_answer(ORDER_V2)),
            _ => (
                404,
                r#"{"error_code": 40403, "message": "Schema not found"}"#.to_string(),
            ),
        }
    });
    common::serve_http(listener, handler);

    let replica = setup.spawn(&[("STRATA_SCHEMA_REGISTRY_URL", &url)]);
    // While the registry is away: registry errors counted, not ready, nothing dead-lettered.
    replica
        .wait_metric(
            "strata_schema_registry_errors_total",
            3.0,
            "registry errors while it is away",
        )
        .await;
    assert_eq!(
        replica.http_status("/readyz").await,
        503,
        "ready during a registry outage"
    );
    assert_eq!(
        replica
            .metric("strata_records_dead_lettered_total")
            .await
            .unwrap_or(0.0),
        0.0
    );
    assert!(
        setup.progress().await.is_empty(),
        "committed while the registry was away"
    );

    up.store(true, Ordering::SeqCst);
    setup.catch_up(&produced, &[&replica]).await;
    let dead = replica
        .metric("strata_records_dead_lettered_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(replica.http_status("/readyz").await, 200, "ready again");
    replica.stop(Duration::from_secs(30));
    assert_eq!(
        dead as usize,
        produced.bad.len(),
        "only the undecodable records are dead-lettered"
    );
    setup.assert_exact(&produced).await;
}
