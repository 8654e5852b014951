//! The composition root: the one place that knows the order of a replica's life.
//!
//! Start-up: the registry client and the dead-letter producer, the HTTP endpoint (so readiness is
//! visible from the first second), the dead-letter topics, the Silver tables, Gold stage 1 on its
//! source table and Gold stage 2 beside the pipeline, then the consumer. Shutdown, in reverse:
//! stop consuming, drain and commit within the grace period, answer the final revocation so the
//! consumer leaves the group, let Gold stage 2 commit, stop the endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, MaintenanceConfig};
use crate::gold::stage1::Emitter;
use crate::kafka::consumer::{Source, SourceSettings};
use crate::kafka::event_loop;
use crate::lake;
use crate::lake::OpenError;
use crate::ops::{Metrics, NotReady};
use crate::retry::{Pace, Retry};
use crate::schema::registry::SchemaRegistry;
use crate::silver::dead_letters::DeadLetters;
use crate::silver::pipeline::{PipelineError, Replica, RunSummary};
use crate::silver::tables::open_tables;
use crate::silver::tables::{Tables, TablesError};

/// Opens Gold stage 1 on its source table.
async fn open_gold(
    config: &Config,
    settings: &crate::config::GoldConfig,
    tables: &Tables,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Emitter, PipelineError> {
    let index = match &settings.table {
        Some(name) => tables
            .list
            .iter()
            .position(|t| &t.name == name)
            .ok_or_else(|| {
                PipelineError::Config(format!(
                    "STRATA_GOLD_TABLE={name} is not one of the tables ({})",
                    tables.names().join(", ")
                ))
            })?,
        None if tables.list.is_empty() => {
            return Err(PipelineError::Config(
                "Gold needs a Silver table at start-up (STRATA_GOLD_TABLE)".into(),
            ))
        }
        None => 0,
    };
    let table = &tables.list[index];
    let mut retry = Retry::new(Pace::Outage, shutdown);
    loop {
        // Opening asks the cluster and the lake, which can take long: shutdown does not wait.
        let schema = table.decoder.output_schema();
        let opened = tokio::select! {
            opened = Emitter::open(
                config,
                settings,
                index,
                &table.name,
                &schema,
                metrics.clone(),
            ) => opened,
            () = shutdown.cancelled() => return Err(PipelineError::Interrupted),
        };
        match opened {
            Ok(emitter) => {
                metrics.not_ready(NotReady::Lake, false);
                return Ok(emitter);
            }
            Err(OpenError::Schema(why)) => return Err(PipelineError::Config(why)),
            // An unreachable broker or lake is waited out, not ready meanwhile, as for Silver.
            Err(OpenError::Storage(why)) => {
                metrics.not_ready(NotReady::Lake, true);
                tracing::warn!(error = %why, "opening Gold failed; retrying");
                if !retry.wait().await {
                    return Err(PipelineError::Interrupted);
                }
            }
        }
    }
}

/// Runs one replica until `shutdown` is cancelled, then flushes, commits, leaves the group and
/// returns what it did.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<RunSummary, PipelineError> {
    lake::register_object_stores_trusting(config.s3_ca_bundle.as_deref())
        .map_err(|e| PipelineError::Config(format!("AWS_CA_BUNDLE: {e}")))?;
    let registry = SchemaRegistry::from_config(&config.registry)
        .map_err(|e| PipelineError::Config(e.to_string()))?;
    let dead_letters = DeadLetters::new(
        &config.brokers,
        &config.kafka_properties,
        &config.dead_letters,
        config.producer_compression,
        metrics.clone(),
        shutdown.clone(),
    )?;
    metrics.buffered_bytes_limit(config.file_max_bytes);

    let (listener, bound) = crate::ops::http::bind(config.metrics_addr).await?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::ops::http::serve(
        listener,
        metrics.clone(),
        server_stop.clone(),
    ));
    // Dead-letter topics exist before the first dead letter is due (or the replica says why not).
    tokio::select! {
        () = dead_letters.prepare(&config.topics) => {}
        () = shutdown.cancelled() => {
            server_stop.cancel();
            let _ = server.await;
            tracing::info!("shut down before start-up finished");
            return Ok(RunSummary::default());
        }
    }
    let tables = match open_tables(&config, &registry, &metrics, &shutdown).await {
        Ok(tables) => tables,
        Err(e) => {
            server_stop.cancel();
            let _ = server.await;
            // A signal while start-up waited for the registry or the lake: nothing was consumed,
            // so there is nothing to drain; that is a clean stop.
            if matches!(e, TablesError::Interrupted) {
                tracing::info!("shut down before start-up finished");
                return Ok(RunSummary::default());
            }
            return Err(e.into());
        }
    };

    let gold = match &config.gold {
        Some(settings) => match open_gold(&config, settings, &tables, &metrics, &shutdown).await {
            Ok(emitter) => Some(emitter),
            Err(e) => {
                server_stop.cancel();
                let _ = server.await;
                if matches!(e, PipelineError::Interrupted) {
                    tracing::info!("shut down before start-up finished");
                    return Ok(RunSummary::default());
                }
                return Err(e);
            }
        },
        None => None,
    };
    // Gold stage 2 runs beside the pipeline until the pipeline has drained (so the last epochs'
    // markers can still be merged), then commits and stops. If it fails, the replica stops.
    let gold_stop = CancellationToken::new();
    let stage2 = match (&config.gold, &gold) {
        (Some(settings), Some(emitter)) => {
            let table = &tables.list[emitter.table];
            let task = crate::gold::stage2::run(
                config.clone(),
                settings.clone(),
                table.name.clone(),
                table.decoder.output_schema(),
                metrics.clone(),
                gold_stop.clone(),
            );
            let stop_all = shutdown.clone();
            Some(tokio::spawn(async move {
                let result = task.await;
                if let Err(e) = &result {
                    tracing::error!(error = %e, "Gold stage 2 failed; stopping the replica");
                    stop_all.cancel();
                }
                result
            }))
        }
        _ => None,
    };
    let (events_tx, events) = mpsc::channel(16);
    let source = Source::start(
        SourceSettings {
            brokers: config.brokers.clone(),
            group_id: config.group_id.clone(),
            topics: config.topics.clone(),
            properties: config.kafka_properties.clone(),
            counts_assignments: true,
            strict_offsets: false,
            reports_caught_up: true,
            thread_name: "strata-source",
        },
        metrics.clone(),
        events_tx,
    )?;
    metrics.initialize(&config.topics, &tables.names());

    let grace = config.shutdown_grace;
    // Table maintenance runs beside the pipeline, in whichever replica owns partition 0.
    let maintainer = Arc::new(AtomicBool::new(false));
    // Its own token: it stops when the pipeline stops, whether for a signal or an error.
    let maintenance_stop = shutdown.child_token();
    let maintenance = tokio::spawn(maintain_periodically(
        config.lake_url.clone(),
        config.maintenance.clone(),
        maintainer.clone(),
        metrics.clone(),
        maintenance_stop.clone(),
    ));
    let mut replica = Replica::new(
        config,
        metrics.clone(),
        registry,
        tables,
        dead_letters,
        source.commands(),
        maintainer.clone(),
        shutdown.clone(),
        gold,
    );
    let stopping = || metrics.not_ready(NotReady::ShuttingDown, true);
    let drained = event_loop::run(&mut replica, source, events, &shutdown, grace, stopping).await;
    let mut summary = replica.finish();
    gold_stop.cancel();
    maintenance_stop.cancel();
    let _ = maintenance.await;
    let mut gold_failed = None;
    if let Some(stage2) = stage2 {
        match tokio::time::timeout(grace, stage2).await {
            Ok(Ok(Ok(gold))) => summary.gold = Some(gold),
            Ok(Ok(Err(e))) => gold_failed = Some(PipelineError::Stage2(Box::new(e))),
            Ok(Err(e)) => gold_failed = Some(PipelineError::Task(e)),
            Err(_) => gold_failed = Some(PipelineError::GraceExceeded(grace)),
        }
    }
    server_stop.cancel();
    let _ = server.await;
    drained?;
    match gold_failed {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// Every `STRATA_MAINTENANCE_INTERVAL`, while this replica is the maintainer: one maintenance pass
/// over every table of the lake. A failed pass is counted and tried again next time.
async fn maintain_periodically(
    lake_url: String,
    settings: MaintenanceConfig,
    maintainer: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // not at start-up: the first pass waits one interval
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !maintainer.load(Ordering::Relaxed) {
            continue;
        }
        let pass = maintain_once(&lake_url, &settings, &metrics);
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = pass => {}
        }
    }
}

/// One maintenance pass over every table under the lake; `strata maintain` runs exactly this.
/// Returns how many tables failed.
pub async fn maintain_once(
    lake_url: &str,
    settings: &MaintenanceConfig,
    metrics: &Metrics,
) -> usize {
    let tables = match crate::lake::maintenance::tables(lake_url).await {
        Ok(tables) => tables,
        Err(e) => {
            metrics.maintained("(lake)", Err(&e.to_string()));
            return 1;
        }
    };
    let mut failed = 0;
    for (name, url) in tables {
        match crate::lake::maintenance::maintain(url, &settings.retention).await {
            Ok(report) => metrics.maintained(&name, Ok(&report)),
            Err(e) => {
                failed += 1;
                metrics.maintained(&name, Err(&e.to_string()));
            }
        }
    }
    failed
}
