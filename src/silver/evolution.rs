//! Under `STRATA_READER_SCHEMA=latest`: a table follows its subject's newest version, evolving
//! its schema with an explicit metadata commit, or refusing a version it cannot take.

use crate::config::ReaderSchemas;
use crate::models::TopicPartition;
use crate::ops::NotReady;
use crate::retry::{Pace, Retry};
use crate::schema::lookup::{Answer, Ask};
use crate::schema::reader::reader_from_version;
use crate::silver::tables::EvolveError;

use super::pipeline::{PipelineError, Replica};

impl Replica {
    /// Under `latest`: moves the table to its subject's newest version if that is new.
    pub(super) async fn follow_latest(
        &mut self,
        index: usize,
        tp: &TopicPartition,
    ) -> Result<(), PipelineError> {
        if self.config.reader_schemas != ReaderSchemas::Latest {
            return Ok(());
        }
        let record = self.tables.list[index].reader.record.clone();
        let subject = self.tables.list[index]
            .reader
            .subject
            .clone()
            .unwrap_or_else(|| self.config.subject_strategy.subject(&tp.topic, &record));
        let version = match self.ask(Ask::Latest(&subject)).await {
            Answer::Version(version) => version,
            _ => return Ok(()),
        };
        if !self.tables.list[index].wants_version(version.id) {
            return Ok(());
        }
        let next = reader_from_version(&version, &record);
        let mut retry = Retry::new(Pace::Outage, &self.shutdown);
        loop {
            let table = &mut self.tables.list[index];
            let result = match &next {
                Ok(next) => table.evolve(next.clone()).await,
                Err(e) => Err(EvolveError::Refused(e.to_string())),
            };
            match result {
                Ok(()) => {
                    self.metrics.schema_evolved(&table.name, "evolved");
                    return Ok(());
                }
                Err(EvolveError::Refused(why)) => {
                    self.metrics.schema_evolved(&table.name, "refused");
                    tracing::error!(table = %table.name, subject = %subject, schema_id = version.id, reason = %why,
                        "newest reader schema refused; the table keeps its schema");
                    return Ok(());
                }
                Err(EvolveError::Storage(e)) => {
                    self.metrics.not_ready(NotReady::Lake, true);
                    tracing::warn!(table = %table.name, error = %e, "evolving the table failed; retrying");
                    if !retry.wait().await {
                        return Err(e.into());
                    }
                }
            }
        }
    }
}
