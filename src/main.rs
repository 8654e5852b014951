//! The `strata` binary: parse configuration, set up telemetry, run. Everything else is the library.

use std::process::ExitCode;
use std::sync::Arc;

use strata::config::{help_text, Config};
use tokio_util::sync::CancellationToken;

fn init_tracing(default_filter: &str, default_format: &str) {
    let mut filter = std::env::var("STRATA_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default_filter.into());
    // The Delta kernel logs every error it returns at ERROR level, "this table has no commits yet"
    // included, before Strata creates the table. Strata reports the errors that matter itself.
    if !filter.contains("buoyant_kernel") {
        filter.push_str(",buoyant_kernel::snapshot=off");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let format = std::env::var("STRATA_LOG_FORMAT").unwrap_or_else(|_| default_format.into());
    if format == "text" {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// First SIGTERM/SIGINT cancels the token (graceful drain); a second one exits at once.
fn install_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        let mut signals = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            signals += 1;
            if signals == 1 {
                tracing::info!("shutdown requested: draining");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
}

#[cfg(feature = "demo")]
async fn demo() -> ExitCode {
    init_tracing("error", "text");
    match strata::demo::run(strata::demo::DemoOptions::from_env()).await {
        Ok(report) if report.exact => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("strata demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "demo"))]
async fn demo() -> ExitCode {
    eprintln!("strata: this build has no demo (build with `--features demo`, or run `make demo`)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("run");
    if matches!(command, "--help" | "-h" | "help") {
        print!("{}", help_text());
        return ExitCode::SUCCESS;
    }
    if matches!(command, "--version" | "-V" | "version") {
        let (version, features) = strata::kafka::librdkafka_build();
        println!(
            "strata {} ({})\nlibrdkafka {version}\nbuiltin.features {features}",
            env!("CARGO_PKG_VERSION"),
            env!("STRATA_GIT_SHA")
        );
        return ExitCode::SUCCESS;
    }
    if !matches!(command, "run" | "demo" | "schemas" | "maintain") {
        eprintln!("strata: unknown command {command:?}\n\n{}", help_text());
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("strata: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        if command == "maintain" {
            return maintain_command().await;
        }
        if command == "schemas" {
            return schemas_command(&args[1..]).await;
        }
        if command == "demo" {
            return demo().await;
        }
        let config = match Config::from_env() {
            Ok(config) => config,
            Err(e) => {
                eprintln!("strata: {e}\n(run `strata --help` for every variable)");
                return ExitCode::from(2);
            }
        };
        init_tracing("info", "json");
        let (librdkafka, features) = strata::kafka::librdkafka_build();
        tracing::info!(
            config = ?config,
            version = env!("CARGO_PKG_VERSION"),
            git_sha = env!("STRATA_GIT_SHA"),
            librdkafka,
            builtin_features = features,
            "starting replica"
        );
        let shutdown = CancellationToken::new();
        install_signals(shutdown.clone());
        let metrics = Arc::new(strata::ops::Metrics::new());
        match strata::app::run(config, metrics, shutdown).await {
            Ok(summary) => {
                tracing::info!(?summary, "stopped cleanly");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "replica stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}

/// `strata maintain`: one maintenance pass over every table of the lake (log cleanup, vacuum,
/// Gold state files), then exit; for a CronJob or a person. Exit 1 when a table failed.
async fn maintain_command() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("strata: {e}\n(run `strata --help` for every variable)");
            return ExitCode::from(2);
        }
    };
    init_tracing("info", "text");
    if let Err(e) = strata::lake::register_object_stores_trusting(config.s3_ca_bundle.as_deref()) {
        eprintln!("strata: AWS_CA_BUNDLE: {e}");
        return ExitCode::from(2);
    }
    let metrics = strata::ops::Metrics::new();
    let failed = strata::app::maintain_once(&config.lake_url, &config.maintenance, &metrics).await;
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `strata schemas check [FILE|DIR ...]`
async fn schemas_command(args: &[String]) -> ExitCode {
    if args.first().map(String::as_str) != Some("check") {
        eprintln!("usage: strata schemas check [FILE.avsc|DIR ...]   (default: schemas/)");
        return ExitCode::from(2);
    }
    let settings = match strata::schema::check::CheckSettings::from_env(&args[1..]) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("strata schemas check: {e}");
            return ExitCode::from(2);
        }
    };
    let mut report = String::new();
    let code = strata::schema::check::run(&settings, &mut report).await;
    print!("{report}");
    ExitCode::from(code)
}
