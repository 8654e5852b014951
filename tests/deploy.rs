//! deploy/ checked by the tools that can check it here: promtool (rules syntax and a unit test for
//! every alert), kubernetes-validate and kubectl kustomize (manifests), PyYAML (compose). The tools
//! are installed by scripts/install-tools.sh; `make test` passes their paths.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run with `make test`")),
    )
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn prometheus_rules_are_valid_and_every_alert_is_unit_tested() {
    let promtool = tool("STRATA_TEST_PROMTOOL");
    let rules = root().join("deploy/prometheus/rules.yaml");
    let text = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(text.contains("SUCCESS"), "{text}");
    let text = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(root().join("deploy/prometheus/rules_test.yaml")));
    assert!(text.contains("SUCCESS"), "{text}");

    // Every alert has a summary, a runbook line, and a firing case in the unit tests.
    let rules_text = std::fs::read_to_string(&rules).expect("rules");
    let tests_text =
        std::fs::read_to_string(root().join("deploy/prometheus/rules_test.yaml")).expect("tests");
    let alerts: Vec<&str> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    for alert in &alerts {
        let section = rules_text
            .split("- alert: ")
            .find(|s| s.starts_with(alert))
            .expect("section");
        assert!(
            section.contains("summary:") && section.contains("runbook:"),
            "{alert} needs a summary and a runbook line"
        );
        let tested = tests_text
            .split("alertname: ")
            .skip(1)
            .filter(|s| s.starts_with(&format!("{alert}\n")))
            .collect::<Vec<_>>();
        assert!(
            tested.iter().any(|s| s.contains("exp_labels")),
            "{alert} has no firing test case"
        );
        assert!(
            tested.iter().any(|s| {
                s.lines()
                    .nth(1)
                    .is_some_and(|l| l.trim() == "exp_alerts: []")
            }) || tests_text.contains(&format!("alertname: {alert}\n        exp_alerts: []")),
            "{alert} has no silent test case"
        );
    }
}

#[test]
fn kubernetes_manifests_and_compose_validate() {
    let python = tool("STRATA_TEST_DEPLOY_PYTHON");
    let text = run(Command::new(python).arg(root().join("scripts/check-deploy.py")));
    assert!(text.contains("validates (Kubernetes"), "{text}");
    assert!(text.contains("compose parses"), "{text}");
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_carries_every_linked_library() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    let runtime = text.rsplit("FROM ").next().expect("runtime stage");
    assert!(
        !runtime.contains("cargo") && !runtime.contains("rustc"),
        "no build tools at runtime"
    );
    assert!(runtime.contains("USER 10001"), "non-root user");
    // Every shared library the binary links directly is installed in the runtime image.
    let output = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_strata")])
        .output()
        .expect("readelf (binutils)");
    let dynamic = String::from_utf8_lossy(&output.stdout);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(needed.iter().any(|l| l.starts_with("libssl")), "{needed:?}");
    for library in needed {
        let package = match library.split(".so").next().unwrap_or(library) {
            "libc" | "libm" | "libgcc_s" | "libdl" | "libpthread" | "librt" | "ld-linux-x86-64" => {
                continue
            }
            "libssl" | "libcrypto" => "libssl3",
            "libsasl2" => "libsasl2-2",
            "libcurl" => "libcurl4",
            "libz" => "zlib1g",
            other => panic!("{library} ({other}) is linked: map it to the Debian package deploy/Dockerfile installs"),
        };
        assert!(
            runtime.contains(package),
            "the runtime image lacks {package} for {library}"
        );
    }
    // Every file the build needs is copied (Cargo refuses a manifest whose targets are missing).
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    for dir in ["src", "benches", "examples"] {
        if manifest.contains(&format!("{dir}/")) || root().join(dir).is_dir() {
            assert!(
                text.contains(&format!("COPY {dir} ")),
                "the build stage must copy {dir}/"
            );
        }
    }
}
