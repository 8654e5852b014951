//! A flush: every table writes its buffered rows as Parquet files and makes one Delta commit with
//! the `txn` of every partition it holds (see `lake::commit` for the rule that makes it exactly
//! once); then Gold's epochs are sent, in the background ([`Epochs`]). A flush that fails stalls
//! the replica (fetching paused, not ready, the uploaded files kept) and is tried again from a
//! tick with backoff; the final flush after shutdown retries until the grace period ends. Group
//! offsets are advisory and committed apart (`pipeline::advise_positions`).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::gold::core::watermark::{clock_version, recorded_clock};
use crate::gold::stage1::EmitError;
use crate::lake::commit::{Checked, CommitOutcome};
use crate::models::TopicPartition;
use crate::retry::{Pace, Retry, Stall};
use crate::silver::tables::Uploads;

use super::pipeline::{PipelineError, Replica};

/// The side `txn` of Gold's source table holding, per partition, the replica's clock at the
/// commit that stored its offsets (`watermark::clock_version`; see `Epoch::clock` in Gold stage 1).
pub(super) const CLOCK: &str = "clock";

/// What a flush does with the Gold epochs its commit makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Epochs {
    /// Sent by a task of their own while consuming goes on; the next flush waits for them
    /// before Silver commits more (`gold::stage1::Emitter::start`).
    InBackground,
    /// Sent and recorded before the flush returns: before a revocation is answered, and at
    /// the end of a run.
    Sent,
}

impl Replica {
    /// Writes and commits everything buffered, once. When that fails the replica stalls instead
    /// of waiting in here: it asks the source to pause fetching (the consumer keeps polling, so a
    /// long store outage never costs the group membership), reports the store as refusing, and
    /// the next attempt comes from a tick (`retry_stalled`). Nothing is lost: the rows stay
    /// buffered, and the files already uploaded are kept for the retry.
    pub(super) async fn flush(&mut self, epochs: Epochs) -> Result<(), PipelineError> {
        match self.try_flush(epochs).await {
            Ok(()) => {
                if self.commands.unstall(&mut self.stalled) {
                    tracing::info!("the stores take writes again; fetching resumes");
                }
                self.metrics.lake_refuses(None);
                self.metrics.partials_refused(None);
                Ok(())
            }
            Err(e) => {
                self.stall_on(&e);
                Ok(())
            }
        }
    }

    /// A flush, or the sending of its Gold epochs, failed: fetching pauses and the flush is tried
    /// again from a tick (`retry_stalled`).
    pub(super) fn stall_on(&mut self, e: &PipelineError) {
        let delay = self.commands.stall(&mut self.stalled);
        let uploaded: usize = self
            .tables
            .list
            .iter()
            .map(|t| t.uploads.file_count())
            .sum();
        let failed = self.report_refusal(e);
        tracing::warn!(error = %e, retry_in = ?delay, uploaded_files_kept = uploaded,
            "{failed} failed; fetching paused, buffered rows kept");
    }

    /// Reports which store refuses, for `/readyz`: Gold's partials topic when the epochs' messages
    /// could not be sent, else the lake. Returns what failed, for the log.
    fn report_refusal(&self, e: &PipelineError) -> &'static str {
        if let PipelineError::Gold(EmitError::Kafka(kafka)) = e {
            let topic = self.config.gold.as_ref().map_or("", |g| &g.partials_topic);
            self.metrics
                .partials_refused(Some(&format!("{topic}: {kafka}")));
            "sending Gold's epochs"
        } else {
            // A flush sends Gold's queued epochs before anything else, so any other error means
            // the partials topic took them (or had nothing to take).
            self.metrics.partials_refused(None);
            self.metrics.lake_refuses(Some(&self.refusal(e)));
            "flush"
        }
    }

    /// Which store refuses and how, for `/readyz`: the lake and the end of the error (the
    /// innermost cause, such as the store's own answer, comes last).
    fn refusal(&self, error: &PipelineError) -> String {
        let text = error.to_string();
        let count = text.chars().count();
        let why = if count > 300 {
            let tail: String = text.chars().skip(count - 300).collect();
            format!("…{tail}")
        } else {
            text
        };
        format!("{}: {why}", self.config.lake_url)
    }

    /// The stalled flush's next attempt, when it is due.
    pub(super) async fn retry_stalled(&mut self) -> Result<(), PipelineError> {
        if self.stalled.as_ref().is_some_and(Stall::due) {
            self.flush(Epochs::InBackground).await?;
        }
        Ok(())
    }

    /// The final flush after shutdown: retried until it succeeds or the stop ends the wait
    /// (then the work is left uncommitted, which loses nothing).
    pub(super) async fn flush_to_the_end(&mut self) -> Result<(), PipelineError> {
        let mut retry = Retry::new(Pace::Outage, &self.shutdown);
        loop {
            match self.try_flush(Epochs::Sent).await {
                Ok(()) => {
                    self.metrics.lake_refuses(None);
                    self.metrics.partials_refused(None);
                    return Ok(());
                }
                Err(e) => {
                    let failed = self.report_refusal(&e);
                    tracing::warn!(error = %e, "final {failed} failed; retrying");
                    if !retry.wait().await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// One flush: per table, check ownership, write its files and commit them with the `txn` of
    /// every partition it has not recorded yet. A table whose commit landed is not redone when a
    /// later table's commit is fenced (its progress moved, so the retry finds nothing to do there).
    pub(super) async fn try_flush(&mut self, epochs: Epochs) -> Result<(), PipelineError> {
        let started = Instant::now();
        // Epochs Silver holds but Gold has not recorded go first (the last flush's, still being
        // sent, and replays): a partition's epoch is recorded before Silver commits more of it,
        // so a replay after a crash cuts the same epochs.
        self.send_gold().await?;
        'again: loop {
            let pending: BTreeMap<TopicPartition, i64> = self
                .parts
                .iter()
                .filter_map(|(tp, s)| s.pending_last.map(|last| (tp.clone(), last)))
                .collect();
            if pending.is_empty() {
                self.oldest = None;
                self.flush_clock = None;
                return Ok(());
            }
            // The replica's clock for this flush, fixed at its first attempt so that a retry
            // commits the same value (a commit in doubt is then recognised as exactly this one).
            // Gold's source table records it per partition: Gold bounds the rows' watermark by it.
            let clock = *self
                .flush_clock
                .get_or_insert_with(|| chrono::Utc::now().timestamp_micros());
            let gold_table = self.gold.as_ref().map(|g| g.table);
            for index in 0..self.tables.list.len() {
                let table = &mut self.tables.list[index];
                let mut last_offsets = BTreeMap::new();
                let mut batches = Vec::new();
                let mut rows = 0u64;
                for (tp, last) in &pending {
                    let part = table.parts.entry(tp.clone()).or_default();
                    if part.committed.is_none_or(|held| held < *last) {
                        last_offsets.insert(tp.clone(), *last);
                        batches.extend(part.batches.iter().cloned());
                        rows += part.rows as u64;
                    }
                }
                if last_offsets.is_empty() {
                    continue;
                }
                let extra: Vec<(String, i64)> = if gold_table == Some(index) {
                    last_offsets
                        .iter()
                        .map(|(tp, last)| {
                            (
                                table.committer.side_app_id(CLOCK, tp),
                                clock_version(clock, *last),
                            )
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                // Check ownership before writing, so fenced work costs no upload; a commit whose
                // answer was lost is settled from the log first, so its work is not written twice.
                let outcome = match table.committer.check_with(&last_offsets, &extra).await? {
                    Checked::Fenced(fenced) => {
                        self.on_fenced(index, fenced).await?;
                        continue 'again;
                    }
                    Checked::Landed(version) => CommitOutcome::Committed {
                        version,
                        attempts: 1,
                        checkpoint: None,
                    },
                    Checked::Owned => {
                        // Files a failed flush uploaded are kept: only the rest is uploaded now.
                        let partitions: Vec<TopicPartition> =
                            last_offsets.keys().cloned().collect();
                        let files = table.upload(&partitions).await?;
                        crate::failpoint!("before_commit");
                        table
                            .committer
                            .commit_with(files, &last_offsets, &extra)
                            .await?
                    }
                };
                let sizes = table.uploads.sizes();
                // Committed, or fenced: either way these files are done with.
                table.uploads = Uploads::default();
                match outcome {
                    CommitOutcome::Fenced(fenced) => {
                        // Lost a race for ownership after the upload: those files stay unreferenced
                        // (vacuum removes them); the rest is written again.
                        self.on_fenced(index, fenced).await?;
                        continue 'again;
                    }
                    CommitOutcome::Committed {
                        version,
                        attempts,
                        checkpoint,
                    } => {
                        crate::failpoint!("after_delta_commit");
                        // Late: behind the watermark every owned partition had already passed.
                        let watermark_before = self
                            .parts
                            .keys()
                            .map(|tp| table.event_high.get(tp).copied())
                            .collect::<Option<Vec<i64>>>()
                            .and_then(|highs| highs.into_iter().min());
                        self.metrics.visible(
                            &table.name,
                            &batches,
                            &self.config.event_time_field,
                            watermark_before,
                        );
                        let mut by_topic: BTreeMap<&str, u64> = BTreeMap::new();
                        for (tp, last) in &last_offsets {
                            if let Some(part) = table.parts.get_mut(tp) {
                                if let Some(gold) = self.gold.as_mut().filter(|g| g.table == index)
                                {
                                    // The clock as the commit recorded it (what a replay reads).
                                    let recorded =
                                        recorded_clock(clock_version(clock, *last), *last);
                                    gold.committed(tp, *last, part.batches.clone(), recorded);
                                }
                                if let Some(newest) =
                                    newest_event_time(&part.batches, &self.config.event_time_field)
                                {
                                    let high = table.event_high.entry(tp.clone()).or_insert(newest);
                                    *high = (*high).max(newest);
                                }
                                *by_topic.entry(tp.topic.as_ref()).or_default() += part.rows as u64;
                                self.metrics.buffered(tp, &table.name, -(part.rows as i64));
                                part.committed = Some(*last);
                                part.batches.clear();
                                part.rows = 0;
                                part.bytes = 0;
                            }
                        }
                        if let Some(watermark) = self
                            .parts
                            .keys()
                            .map(|tp| table.event_high.get(tp).copied())
                            .collect::<Option<Vec<i64>>>()
                            .and_then(|highs| highs.into_iter().min())
                        {
                            self.metrics.watermark(&table.name, watermark);
                        }
                        if let Some(checkpoint) = checkpoint {
                            self.metrics.checkpointed(&table.name, checkpoint);
                        }
                        self.metrics.committed(
                            &table.name,
                            &by_topic,
                            version,
                            &sizes,
                            started.elapsed(),
                            attempts,
                        );
                        self.summary.commits += 1;
                        self.summary.rows_committed += rows;
                        self.summary.files += sizes.len() as u64;
                    }
                }
            }
            for (tp, last) in &pending {
                self.metrics.progress(tp, *last);
                if let Some(state) = self.parts.get_mut(tp) {
                    state.pending_first = None;
                    state.pending_last = None;
                }
            }
            let (_, bytes) = self.tables.buffered();
            self.metrics.buffered_bytes(bytes);
            self.oldest = None;
            self.flush_clock = None;
            self.flushed_at = Instant::now();
            match epochs {
                Epochs::InBackground => {
                    if let Some(gold) = &mut self.gold {
                        gold.start();
                    }
                }
                Epochs::Sent => self.send_gold().await?,
            }
            // Everything the flush held the event loop for: the last send's wait at its start,
            // and its own epochs' when it sends them.
            self.metrics.flushed(started.elapsed());
            return Ok(());
        }
    }
}

/// The newest event time (microseconds) among `batches`.
fn newest_event_time(batches: &[deltalake::arrow::array::RecordBatch], field: &str) -> Option<i64> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::TimestampMicrosecondType;
    batches
        .iter()
        .filter_map(|b| {
            b.column_by_name(field)
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                .and_then(deltalake::arrow::compute::max)
        })
        .max()
}
