//! The Confluent Schema Registry client against Confluent's documented responses.
//!
//! No Confluent-compatible registry can be installed here, so a tiny HTTP server replays the answers
//! documented in the Schema Registry API reference (GET /schemas/ids/{id}, and the error bodies with
//! `error_code` 40403, 50001, 40101). These are RECORDED responses, labelled as such.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use strata::config::{RegistryAccess, RegistryAuth, RegistrySource, Secret};
use strata::schema::registry::{ConfluentClient, RegistryError, SchemaRegistry};
use tokio::net::TcpListener;

/// Recorded from the Confluent Schema Registry API reference: `GET /schemas/ids/1`.
const RECORDED_SCHEMA_1: &str = r#"{"schema": "{\"type\": \"record\", \"name\": \"Order\", \"fields\": [{\"name\": \"id\", \"type\": \"long\"}]}"}"#;
/// A PROTOBUF schema as the registry returns it (with `schemaType`).
const RECORDED_PROTOBUF: &str =
    r#"{"schemaType": "PROTOBUF", "schema": "syntax = \"proto3\"; message M { int64 id = 1; }"}"#;
/// Recorded error bodies.
const RECORDED_40403: &str = r#"{"error_code": 40403, "message": "Schema not found"}"#;
const RECORDED_50001: &str =
    r#"{"error_code": 50001, "message": "Error in the backend data store"}"#;
const RECORDED_40101: &str = r#"{"error_code": 40101, "message": "Unauthorized"}"#;

/// Serves `routes` (path → status, body); counts requests. A route answering 401 answers 200
/// with schema 1 when the request carries basic auth.
async fn serve(routes: HashMap<&'static str, (u16, &'static str)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handler: common::Handler = Arc::new(move |path: &str, request: &str| {
        let auth = request
            .to_ascii_lowercase()
            .contains("authorization: basic");
        let (status, body) = match routes.get(path) {
            Some((401, _)) if auth => (200, RECORDED_SCHEMA_1),
            Some(found) => *found,
            None => (
                404,
                r#"{"error_code": 404, "message": "HTTP 404 Not Found"}"#,
            ),
        };
        (status, body.to_string())
    });
    (
        format!("http://{addr}"),
        common::serve_http(listener, handler),
    )
}

fn routes() -> HashMap<&'static str, (u16, &'static str)> {
    HashMap::from([
        ("/schemas/ids/1", (200, RECORDED_SCHEMA_1)),
        ("/schemas/ids/2", (200, RECORDED_PROTOBUF)),
        ("/schemas/ids/3", (404, RECORDED_40403)),
        ("/schemas/ids/4", (500, RECORDED_50001)),
        ("/schemas/ids/5", (401, RECORDED_40101)),
        ("/schemas/ids/6", (200, "this is not json")),
    ])
}

#[tokio::test]
async fn documented_answers_are_classified_by_what_the_caller_should_do() {
    let (url, _) = serve(routes()).await;
    let client = ConfluentClient::new(&url).expect("client");

    let schema = client.schema_by_id(1).await.expect("schema 1");
    assert!(
        apache_avro::Schema::parse_str(&schema).is_ok(),
        "returned text is the schema itself: {schema}"
    );

    let not_avro = client.schema_by_id(2).await.expect_err("protobuf");
    assert_eq!(
        not_avro,
        RegistryError::NotAvro {
            id: 2,
            schema_type: "PROTOBUF".into()
        }
    );
    assert!(!not_avro.is_retryable());

    let missing = client.schema_by_id(3).await.expect_err("40403");
    assert_eq!(
        missing,
        RegistryError::NotFound {
            id: 3,
            message: "Schema not found".into()
        }
    );
    assert!(
        !missing.is_retryable(),
        "40403 is the record's problem: unknown_schema"
    );

    let backend = client.schema_by_id(4).await.expect_err("50001");
    assert!(
        matches!(backend, RegistryError::Unavailable(ref m) if m.contains("50001") || m.contains("backend")),
        "{backend:?}"
    );
    assert!(
        backend.is_retryable(),
        "a registry outage must be retried, never dead-lettered"
    );

    let unauthorized = client.schema_by_id(5).await.expect_err("40101");
    assert!(
        matches!(
            unauthorized,
            RegistryError::Unexpected {
                status: 401,
                code: Some(40101),
                ..
            }
        ),
        "{unauthorized:?}"
    );
    assert!(unauthorized.is_retryable());

    let garbage = client.schema_by_id(6).await.expect_err("malformed");
    assert!(
        matches!(garbage, RegistryError::Unexpected { status: 200, .. }),
        "{garbage:?}"
    );
}

#[tokio::test]
async fn basic_auth_is_sent_when_configured() {
    let (url, _) = serve(routes()).await;
    let client = ConfluentClient::with_access(
        &url,
        &RegistryAccess {
            auth: RegistryAuth::Basic(Secret::new("svc:secret")),
            ..RegistryAccess::default()
        },
    )
    .expect("client");
    assert!(
        client.schema_by_id(5).await.is_ok(),
        "credentials were not sent"
    );
}

#[tokio::test]
async fn unreachable_registry_is_retryable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let client = ConfluentClient::new(&format!("http://127.0.0.1:{port}")).expect("client");
    let error = client.schema_by_id(1).await.expect_err("nothing listens");
    assert!(matches!(error, RegistryError::Unavailable(_)), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn answers_are_cached_by_id() {
    let (url, hits) = serve(routes()).await;
    let registry = SchemaRegistry::from_config(&RegistrySource::Confluent {
        url,
        access: RegistryAccess::default(),
    })
    .expect("registry");
    for _ in 0..5 {
        registry.schema_by_id(1).await.expect("schema");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "one request for five look-ups"
    );
}

#[tokio::test]
async fn directory_source_reads_id_files_and_reports_missing_ids() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("7.avsc"), r#""string""#).expect("write");
    let registry =
        SchemaRegistry::from_config(&RegistrySource::Directory(dir.path().to_path_buf()))
            .expect("registry");
    assert_eq!(
        registry.schema_by_id(7).await.expect("7").as_ref(),
        r#""string""#
    );
    assert!(matches!(
        registry.schema_by_id(8).await,
        Err(RegistryError::NotFound { id: 8, .. })
    ));
}

/// Recorded from the API reference: `GET /subjects/{subject}/versions/latest` and `.../versions`.
const RECORDED_LATEST: &str = r#"{"subject": "orders-shop.Order", "id": 7, "version": 2, "schema": "{\"type\": \"record\", \"name\": \"Order\", \"fields\": [{\"name\": \"id\", \"type\": \"long\"}]}"}"#;
const RECORDED_VERSIONS: &str = "[1, 2]";
const RECORDED_SUBJECTS: &str = r#"["orders-shop.Order", "orders-shop.Payment"]"#;
const RECORDED_40401: &str = r#"{"error_code": 40401, "message": "Subject 'nope' not found."}"#;
const RECORDED_40402: &str = r#"{"error_code": 40402, "message": "Version 9 not found."}"#;

#[tokio::test]
async fn subject_versions_and_their_errors() {
    let (url, _) = serve(HashMap::from([
        ("/subjects", (200, RECORDED_SUBJECTS)),
        (
            "/subjects/orders-shop.Order/versions",
            (200, RECORDED_VERSIONS),
        ),
        (
            "/subjects/orders-shop.Order/versions/latest",
            (200, RECORDED_LATEST),
        ),
        (
            "/subjects/orders-shop.Order/versions/1",
            (200, RECORDED_LATEST),
        ),
        (
            "/subjects/orders-shop.Order/versions/2",
            (200, RECORDED_LATEST),
        ),
        ("/subjects/nope/versions/latest", (404, RECORDED_40401)),
        (
            "/subjects/orders-shop.Order/versions/9",
            (404, RECORDED_40402),
        ),
        ("/subjects/a%2Fb%20c/versions/latest", (404, RECORDED_40401)),
        ("/subjects/down/versions/latest", (500, RECORDED_50001)),
    ]))
    .await;
    let client = ConfluentClient::new(&url).expect("client");
    assert_eq!(
        client.subjects().await.expect("subjects"),
        ["orders-shop.Order", "orders-shop.Payment"]
    );
    assert_eq!(
        client
            .versions("orders-shop.Order")
            .await
            .expect("versions"),
        [1, 2]
    );
    let latest = client
        .version("orders-shop.Order", "latest")
        .await
        .expect("latest");
    assert_eq!((latest.id, latest.version), (7, 2));
    assert!(latest.schema.contains("Order"));
    for (subject, version) in [
        ("nope", "latest"),
        ("orders-shop.Order", "9"),
        ("a/b c", "latest"),
    ] {
        let error = client.version(subject, version).await.expect_err(subject);
        assert!(
            matches!(error, RegistryError::SubjectNotFound { .. }) && !error.is_retryable(),
            "{subject}: {error:?}"
        );
    }
    let error = client.version("down", "latest").await.expect_err("down");
    assert!(error.is_retryable(), "{error:?}");

    let registry = SchemaRegistry::from_config(&RegistrySource::Confluent {
        url: url.clone(),
        access: RegistryAccess::default(),
    })
    .expect("registry");
    let all = registry
        .all_versions("orders-shop.Order")
        .await
        .expect("all versions");
    assert_eq!(all.len(), 2);
    // `latest` seeds the id cache: the schema of id 7 needs no request of its own.
    registry.latest("orders-shop.Order").await.expect("latest");
    assert!(registry
        .schema_by_id(7)
        .await
        .expect("cached")
        .contains("Order"));
    let files = SchemaRegistry::from_config(&RegistrySource::Directory("/nonexistent".into()))
        .expect("files");
    assert!(matches!(
        files.latest("orders-value").await,
        Err(RegistryError::NoSubjects(_))
    ));
}
