//! The binary's contract with operators: `--help` lists every variable, bad configuration stops
//! start-up with a message naming the variable, and secrets never reach the output.

use std::process::Command;

fn strata(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_strata"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("run strata");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

const VALID: &[(&str, &str)] = &[
    ("STRATA_TOPICS", "orders"),
    ("STRATA_SCHEMA_REGISTRY_URL", "file:///nonexistent"),
    ("STRATA_EVENT_TIME_FIELD", "event_time"),
    ("STRATA_LAKE_URL", "file:///tmp/strata-cli-test"),
    ("STRATA_METRICS_ADDR", "127.0.0.1:0"),
];

#[test]
fn help_lists_every_variable_with_its_default() {
    let (code, text) = strata(&["--help"], &[]);
    assert_eq!(code, 0);
    for setting in strata::config::SETTINGS {
        assert!(text.contains(setting.var), "--help lacks {}", setting.var);
    }
    assert!(text.contains("[default: 30s]"));
}

#[test]
fn a_bad_value_stops_start_up_naming_the_variable() {
    let mut env = VALID.to_vec();
    env.push(("STRATA_READER_SCHEMA", "schemas/order.avsc"));
    env.push(("STRATA_FLUSH_INTERVAL", "soon"));
    let (code, text) = strata(&["run"], &env);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("STRATA_FLUSH_INTERVAL"), "{text}");

    let (code, text) = strata(&["run"], VALID);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("STRATA_READER_SCHEMA is required"), "{text}");
}

#[test]
fn an_unreadable_reader_schema_is_named_and_fatal() {
    let mut env = VALID.to_vec();
    env.push(("STRATA_READER_SCHEMA", "/nonexistent/order.avsc"));
    env.push(("STRATA_SCHEMA_REGISTRY_USER_INFO", "svc:hunter2"));
    env.push(("STRATA_SCHEMA_REGISTRY_URL", "http://127.0.0.1:1"));
    let (code, text) = strata(&["run"], &env);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("STRATA_READER_SCHEMA=/nonexistent/order.avsc"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "a secret reached the log: {text}"
    );
}

/// Start-up waits out an unreachable object store instead of exiting: alive, not ready (naming
/// the store), and a SIGTERM meanwhile is a clean stop. Needs no broker: tables open before the
/// consumer starts.
#[test]
fn an_unreachable_lake_at_start_up_is_waited_out_and_sigterm_is_clean() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let metrics_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STRATA_TOPICS", "orders")
        .env("STRATA_KAFKA_BROKERS", "127.0.0.1:1")
        .env(
            "STRATA_SCHEMA_REGISTRY_URL",
            format!("file://{}", dir.path().display()),
        )
        .env(
            "STRATA_READER_SCHEMA",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/order.avsc"),
        )
        .env("STRATA_EVENT_TIME_FIELD", "event_time")
        .env("STRATA_LAKE_URL", "s3://nowhere/lake")
        .env("STRATA_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{closed_port}"),
        )
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_ALLOW_HTTP", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn strata");
    let get = |path: &str| -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let status = answer.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, answer))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut ready = None;
    while std::time::Instant::now() < deadline {
        ready = get("/readyz");
        if ready
            .as_ref()
            .is_some_and(|(_, body)| body.contains("object store"))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (status, body) = ready.expect("/readyz answers while start-up waits");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("object store"), "{body}");
    assert_eq!(get("/healthz").map(|(s, _)| s), Some(200), "alive");
    assert!(child.try_wait().expect("wait").is_none(), "still running");

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not stop on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "a signal during start-up is a clean stop: {status}"
    );
}

#[test]
fn version_names_librdkafka_and_its_security_and_codec_features() {
    let (code, text) = strata(&["--version"], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("librdkafka 2."), "{text}");
    let features = text
        .lines()
        .find_map(|l| l.strip_prefix("builtin.features "))
        .unwrap_or_else(|| panic!("no builtin.features line: {text}"));
    for needed in [
        "ssl",
        "sasl_plain",
        "sasl_scram",
        "sasl_oauthbearer",
        "oidc",
        "sasl_gssapi",
        "gzip",
        "snappy",
        "lz4",
        "zstd",
    ] {
        assert!(
            features.split(',').any(|f| f == needed),
            "{needed} missing from {features}"
        );
    }
}
