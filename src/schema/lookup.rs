//! Registry questions, retried through outages and never blamed on a record: an outage makes the
//! replica not ready and is waited out (shutdown ends the wait); a refusal that is a fact (not
//! found, not Avro) is the answer. The caller decides when to ask; this module only knows how.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::ops::{Metrics, NotReady};
use crate::retry::{Pace, Retry};
use crate::schema::registry::{RegistryError, SchemaRegistry, SubjectVersion};

/// A registry question.
pub enum Ask<'a> {
    Id(u32),
    Latest(&'a str),
    Subjects,
}

/// Its answer: what was asked for, a refusal that is a fact (not found, not Avro), or nothing
/// because the replica is shutting down during an outage.
pub enum Answer {
    Schema(Arc<str>),
    Version(SubjectVersion),
    Subjects(Vec<String>),
    Refused(RegistryError),
    ShuttingDown,
}

pub async fn ask_registry(
    registry: &SchemaRegistry,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    question: Ask<'_>,
) -> Answer {
    let mut retry = Retry::new(Pace::Outage, shutdown);
    loop {
        let (answer, what) = match &question {
            Ask::Id(id) => (
                registry.schema_by_id(*id).await.map(Answer::Schema),
                format!("schema id {id}"),
            ),
            Ask::Latest(subject) => (
                registry.latest(subject).await.map(Answer::Version),
                format!("subject {subject}"),
            ),
            Ask::Subjects => (
                registry.subjects().await.map(Answer::Subjects),
                "subjects".to_string(),
            ),
        };
        match answer {
            Ok(answer) => {
                metrics.not_ready(NotReady::Registry, false);
                return answer;
            }
            Err(e) => {
                metrics.registry_error(e.kind(), &what, &e.to_string());
                if !e.is_retryable() {
                    metrics.not_ready(NotReady::Registry, false);
                    return Answer::Refused(e);
                }
                metrics.not_ready(NotReady::Registry, true);
                if !retry.wait().await {
                    return Answer::ShuttingDown;
                }
            }
        }
    }
}
