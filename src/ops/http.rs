//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (alive while it answers) and
//! `/readyz` (200, or 503 with every reason that holds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(route(&metrics, request.uri().path()))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn route(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        // Alive as long as this endpoint answers.
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {}\n", metrics.not_ready_reasons().join(", ")),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the metrics endpoint (port 0 picks a free port; the bound address is returned).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::NotReady;
    use deltalake::arrow::array::RecordBatch;

    #[test]
    fn commits_record_latency_and_late_rows() {
        use deltalake::arrow::array::TimestampMicrosecondArray;
        use deltalake::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        let metrics = Metrics::new();
        metrics.initialize(&["orders".to_string()], &["order".to_string()]);
        let now = chrono::Utc::now().timestamp_micros();
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_time", ts.clone(), false),
            Field::new("_kafka_timestamp", ts, true),
        ]));
        let column = |values: Vec<i64>| {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
                as deltalake::arrow::array::ArrayRef
        };
        let batch = RecordBatch::try_new(
            schema,
            vec![
                column(vec![now - 7_200_000_000, now - 60_000_000, now - 1_000_000]),
                column(vec![now - 2_000_000, now - 2_000_000, now - 2_000_000]),
            ],
        )
        .expect("batch");
        // One row (two hours old) is older than a watermark of ten minutes ago.
        metrics.visible("order", &[batch], "event_time", Some(now - 600_000_000));
        let text = metrics.render();
        assert!(
            text.contains("strata_records_late_total{table=\"order\"} 1"),
            "{text}"
        );
        let kafka = metrics
            .end_to_end_latency
            .with_label_values(&["order", "kafka_timestamp"]);
        assert_eq!(kafka.get_sample_count(), 3);
        assert!((kafka.get_sample_sum() - 6.0).abs() < 1.0);
        let event = metrics
            .end_to_end_latency
            .with_label_values(&["order", "event_time"]);
        assert!(event.get_sample_sum() > 7_200.0);
        // Initialized series exist at zero before anything happens.
        assert!(text.contains(
            "strata_records_dead_lettered_total{reason=\"incompatible_schema\",topic=\"orders\"} 0"
        ));
    }

    #[test]
    fn readiness_needs_every_reason_cleared() {
        let metrics = Metrics::new();
        assert!(!metrics.is_ready(), "not ready before start-up finished");
        metrics.not_ready(NotReady::Starting, false);
        assert!(metrics.is_ready());
        metrics.not_ready(NotReady::Registry, true);
        metrics.not_ready(NotReady::Lake, true);
        // The registry recovering does not make a replica ready whose lake is still down.
        metrics.not_ready(NotReady::Registry, false);
        assert!(!metrics.is_ready());
        assert_eq!(
            metrics.not_ready_reasons(),
            vec!["object store refuses writes"]
        );
        metrics.not_ready(NotReady::Lake, false);
        assert!(metrics.is_ready());
        assert_eq!(route(&metrics, "/readyz").status(), StatusCode::OK);
        metrics.not_ready(NotReady::ShuttingDown, true);
        assert_eq!(
            route(&metrics, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(route(&metrics, "/healthz").status(), StatusCode::OK);
    }
}
