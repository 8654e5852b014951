//! `strata schemas check`, the real binary against a registry answering Confluent's REST calls:
//! each compatibility mode has a change it accepts and one it refuses, with Confluent's meaning,
//! and refusals explain the change and exit non-zero so a producer's CI can gate on it.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::FakeRegistry;
use strata::demo::ORDER_V1;

fn record(fields: &str) -> String {
    format!(r#"{{"type":"record","name":"Order","namespace":"shop","fields":[{fields}]}}"#)
}

const ID: &str = r#"{"name":"id","type":"long"}"#;

/// Runs `strata schemas check` on `schema` (written to a file) with compatibility `mode`.
async fn check(url: &str, mode: &str, schema: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("order.avsc");
    std::fs::write(&file, schema).expect("write");
    let mut command = Command::new(env!("CARGO_BIN_EXE_strata"));
    command
        .args(["schemas", "check", &file.display().to_string()])
        .env_clear()
        .env("STRATA_TOPICS", "orders")
        .env("STRATA_SCHEMA_REGISTRY_URL", url)
        .env("STRATA_SCHEMA_COMPATIBILITY", mode);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run strata");
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_accept_and_refuse_as_confluent_documents() {
    let registry = Arc::new(FakeRegistry::default());
    registry.register("orders-value", 1, &record(ID));
    let url = registry.serve().await;

    // BACKWARD: adding a field with a default is fine; without a default it is not (the new
    // schema could not read old data). FORWARD is the other way round.
    let with_default = record(&format!(
        r#"{ID},{{"name":"coupon","type":["null","string"],"default":null}}"#
    ));
    let without_default = record(&format!(r#"{ID},{{"name":"gift","type":"string"}}"#));
    let (code, text) = check(&url, "BACKWARD", &with_default).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("compatible (BACKWARD, checked against 1 version)"),
        "{text}"
    );
    let (code, text) = check(&url, "BACKWARD", &without_default).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("INCOMPATIBLE under BACKWARD"), "{text}");
    assert!(text.contains("gift"), "the field is named: {text}");
    assert!(
        text.contains("field gift added, without a default"),
        "the change is explained: {text}"
    );
    let (code, text) = check(&url, "FORWARD", &without_default).await;
    assert_eq!(code, 0, "{text}");
    // FORWARD refuses removing a field without a default (old readers need it).
    registry.register("orders-value", 2, &without_default);
    let noted = record(&format!(
        r#"{ID},{{"name":"note","type":"string","default":""}}"#
    ));
    let (code, text) = check(&url, "FORWARD", &noted).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("field gift removed (it had no default)"),
        "{text}"
    );
    assert!(text.contains("field note added, with a default"), "{text}");
    let (code, text) = check(&url, "BACKWARD", &noted).await;
    assert_eq!(code, 0, "{text}");
    // FULL needs both directions.
    let (code, _) = check(&url, "FULL", &noted).await;
    assert_eq!(code, 1);

    // A type change no promotion allows is refused by every mode but NONE.
    let text_id = record(r#"{"name":"id","type":"string"}"#);
    for mode in ["BACKWARD", "FORWARD", "FULL_TRANSITIVE"] {
        let (code, text) = check(&url, mode, &text_id).await;
        assert_eq!(code, 1, "{mode}: {text}");
        assert!(text.contains("field id changed type"), "{text}");
    }
    let (code, _) = check(&url, "NONE", &text_id).await;
    assert_eq!(code, 0);
    // int → long is an Avro promotion: BACKWARD accepts reading old ints as longs.
    let registry_int = Arc::new(FakeRegistry::default());
    registry_int.register("orders-value", 1, &record(r#"{"name":"id","type":"int"}"#));
    let int_url = registry_int.serve().await;
    let (code, text) = check(&int_url, "BACKWARD", &record(ID)).await;
    assert_eq!(code, 0, "{text}");
    let (code, _) = check(&int_url, "FORWARD", &record(ID)).await;
    assert_eq!(code, 1, "a long cannot be read as an int");

    // Already registered, and new subjects.
    let (code, text) = check(&url, "BACKWARD", &without_default).await;
    assert_eq!(code, 0);
    assert!(text.contains("already registered as version 2"), "{text}");
    let empty = Arc::new(FakeRegistry::default()).serve().await;
    let (code, text) = check(&empty, "BACKWARD", ORDER_V1).await;
    assert_eq!(code, 0);
    assert!(text.contains("new subject"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitive_modes_check_every_version_plain_modes_the_latest() {
    // BACKWARD_TRANSITIVE: v1 {id}, v2 {id, coupon default ""}; the candidate makes coupon
    // required. It reads v2's data (coupon present) but not v1's.
    let registry = Arc::new(FakeRegistry::default());
    registry.register("orders-value", 1, &record(ID));
    registry.register(
        "orders-value",
        2,
        &record(&format!(
            r#"{ID},{{"name":"coupon","type":"string","default":""}}"#
        )),
    );
    let url = registry.serve().await;
    let required = record(&format!(r#"{ID},{{"name":"coupon","type":"string"}}"#));
    let (code, text) = check(&url, "BACKWARD", &required).await;
    assert_eq!(code, 0, "{text}");
    let (code, text) = check(&url, "BACKWARD_TRANSITIVE", &required).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("with version 1") && text.contains("coupon"),
        "names the version and field: {text}"
    );
    assert!(!text.contains("with version 2"), "v2 is fine: {text}");

    // FORWARD_TRANSITIVE: v1 {id, coupon required}, v2 {id}; the candidate {id, note default}.
    // v2 reads its data; v1 cannot (no coupon, and v1 has no default for it).
    let registry = Arc::new(FakeRegistry::default());
    registry.register("orders-value", 1, &required);
    registry.register("orders-value", 2, &record(ID));
    let url = registry.serve().await;
    let noted = record(&format!(
        r#"{ID},{{"name":"note","type":"string","default":""}}"#
    ));
    let (code, text) = check(&url, "FORWARD", &noted).await;
    assert_eq!(code, 0, "{text}");
    let (code, text) = check(&url, "FORWARD_TRANSITIVE", &noted).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("with version 1"), "{text}");
    let (code, _) = check(&url, "FULL", &noted).await;
    assert_eq!(code, 0);
    let (code, _) = check(&url, "FULL_TRANSITIVE", &noted).await;
    assert_eq!(code, 1);

    // An unreachable registry is an error of the check (2), not a verdict.
    let port = common::free_port();
    let (code, text) = check(&format!("http://127.0.0.1:{port}"), "BACKWARD", &noted).await;
    assert_eq!(code, 2, "{text}");
}
