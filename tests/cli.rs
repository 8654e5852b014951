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
