//! Records the git commit the binary is built from (`strata_build_info{git_sha}`): taken from
//! `STRATA_GIT_SHA` when set (container builds have no .git), else from git when available.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=STRATA_GIT_SHA");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let sha = std::env::var("STRATA_GIT_SHA").ok().or_else(|| {
        let output = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=STRATA_GIT_SHA={}",
        sha.filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    );
}
