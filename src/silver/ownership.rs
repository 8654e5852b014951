//! Partition ownership: claiming a partition's progress from every table on assignment (the
//! fencing baseline), fencing (a stored `txn` that moved means another replica owns it: its work
//! is dropped and the partition seeks back to the table), seeking back when a table opened mid-run
//! is behind, and dropping the work of partitions that are revoked or lost.

use std::collections::HashMap;

use crate::kafka::claims::Claim;
use crate::kafka::consumer::SourceCommand;
use crate::lake::commit::{CommitError, Fenced};
use crate::models::TopicPartition;
use crate::ops::NotReady;
use crate::retry::{Pace, Retry};

use super::pipeline::{PartitionState, PipelineError, Replica};

impl Replica {
    pub(super) async fn claim_table(
        &mut self,
        index: usize,
        partitions: &[TopicPartition],
    ) -> Result<(), PipelineError> {
        let mut retry = Retry::new(Pace::Outage, &self.shutdown);
        loop {
            match self.claim_table_once(index, partitions).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(table = %self.tables.list[index].name, error = %e, "reading table progress failed; retrying");
                    if !retry.wait().await {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    async fn claim_table_once(
        &mut self,
        index: usize,
        partitions: &[TopicPartition],
    ) -> Result<(), CommitError> {
        let table = &mut self.tables.list[index];
        for (tp, stored) in table.committer.claim(partitions).await? {
            table.parts.entry(tp).or_default().committed = stored;
        }
        Ok(())
    }

    /// Settles the claims that are due: reads every table's (and Gold's) progress of their
    /// partitions, once, then answers the assignment or seeks the fenced partition there. A claim
    /// that fails waits for its next attempt (`kafka::claims`), while the loop goes on answering
    /// revocations.
    pub(super) async fn settle_claims(&mut self) {
        for claim in self.claims.take_due() {
            match self.claim_once(&claim.partitions).await {
                Ok(()) if claim.is_reclaim() => self.reseek_reclaimed(&claim.partitions),
                Ok(()) => self.start_partitions(claim),
                Err(e) => {
                    let delay = self.claims.retry_later(claim);
                    tracing::warn!(error = %e, retry_in = ?delay,
                        "reading table progress failed; the partitions wait for it (an assignment paused, a fenced partition with its records ignored)");
                }
            }
        }
    }

    async fn claim_once(&mut self, partitions: &[TopicPartition]) -> Result<(), CommitError> {
        for index in 0..self.tables.list.len() {
            self.claim_table_once(index, partitions).await?;
        }
        self.claim_gold_once(partitions).await
    }

    /// Claimed partitions start: their state, and the source's answer (where each resumes).
    fn start_partitions(&mut self, claim: Claim) {
        self.note_maintainer(&claim.partitions, true);
        // Ready once the group has given this replica its share (possibly none).
        self.metrics.not_ready(NotReady::Starting, false);
        let mut resume = HashMap::new();
        for tp in &claim.partitions {
            let after = self.resume_after(tp);
            if let Some(version) = after {
                self.metrics.progress(tp, version);
            }
            self.parts.insert(
                tp.clone(),
                PartitionState {
                    position: after.map(|v| v + 1),
                    ..Default::default()
                },
            );
            resume.insert(tp.clone(), after);
        }
        claim.answer(resume);
    }

    /// A table opened mid-run may hold less of an owned partition than has been handled: that
    /// partition seeks back, and the other tables skip what they already hold.
    pub(super) fn reseek_behind(&mut self, index: usize) {
        let behind: Vec<(TopicPartition, i64)> = self
            .parts
            .iter()
            .filter_map(|(tp, state)| {
                let held = self.tables.list[index].parts.get(tp)?.committed?;
                let position = state.position?;
                // Back to the new table's progress, or further to the first uncommitted offset:
                // the buffered work of every table is dropped and read again.
                let from = state.pending_first.map_or(held + 1, |f| f.min(held + 1));
                (held + 1 < position).then_some((tp.clone(), from))
            })
            .collect();
        for (tp, from) in behind {
            tracing::warn!(table = %self.tables.list[index].name, partition = %tp, from, "new table is behind: seeking back");
            self.drop_work(std::slice::from_ref(&tp), "reseek");
            if let Some(state) = self.parts.get_mut(&tp) {
                state.position = Some(from);
                state.awaiting_reseek = true;
            }
            self.commands.send(SourceCommand::Seek(tp, from));
        }
    }

    /// Drops buffered, uncommitted work of these partitions (the tables do not have it, so the
    /// next owner reads it again).
    pub(super) fn drop_work(
        &mut self,
        partitions: &[TopicPartition],
        reason: &'static str,
    ) -> usize {
        let mut dropped = 0;
        for tp in partitions {
            // Counted per partition: the metric is per topic, and each partition's rows once.
            let mut of_partition = 0;
            for table in &mut self.tables.list {
                let rows = table.drop_work(tp);
                self.metrics.buffered(tp, &table.name, -(rows as i64));
                of_partition += rows;
            }
            if let Some(state) = self.parts.get_mut(tp) {
                state.pending_first = None;
                state.pending_last = None;
            }
            self.metrics.dropped(tp, reason, of_partition);
            dropped += of_partition;
        }
        let (_, bytes) = self.tables.buffered();
        self.metrics.buffered_bytes(bytes);
        dropped
    }

    /// The owner of the first Bronze topic's partition 0 maintains the tables (log cleanup,
    /// vacuum): one replica at a time, chosen by the group, with no coordination of its own.
    pub(super) fn note_maintainer(&self, partitions: &[TopicPartition], owned: bool) {
        let Some(first) = self.config.topics.first() else {
            return;
        };
        if partitions
            .iter()
            .any(|tp| tp.partition == 0 && tp.topic.as_ref() == first.as_str())
        {
            self.maintainer
                .store(owned, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(super) fn forget(&mut self, partitions: &[TopicPartition], reason: &'static str) {
        // A re-claim a fence queued (even during the revocation's own flush) ends here too.
        self.claims.revoke(partitions);
        self.note_maintainer(partitions, false);
        self.drop_work(partitions, reason);
        for tp in partitions {
            self.parts.remove(tp);
            self.advised.0.remove(tp);
            if let Some(gold) = &mut self.gold {
                gold.release(tp);
            }
            for table in &mut self.tables.list {
                table.parts.remove(tp);
                table.committer.release(std::slice::from_ref(tp));
            }
        }
    }

    /// Fenced partitions lose their buffered work in every table, then resume from the tables'
    /// progress (if the source still owns them; otherwise their revocation follows).
    pub(super) async fn on_fenced(
        &mut self,
        table: usize,
        fenced: Vec<Fenced>,
    ) -> Result<(), PipelineError> {
        for f in fenced {
            let tp = f.partition.clone();
            if f.own_commit {
                self.drop_own_landed(&f);
            } else {
                let dropped = self.drop_work(std::slice::from_ref(&tp), "fenced");
                self.metrics.fenced(
                    &self.tables.list[table].name,
                    &tp,
                    f.expected,
                    f.stored,
                    dropped,
                );
                self.summary.fenced_partitions += 1;
            }
            self.reclaim(tp).await;
        }
        Ok(())
    }

    /// This replica's own commit, whose answer was lost, landed with part of the partition's
    /// buffered work: the work is dropped (the table holds it up to `f.stored`, the rest is read
    /// again from there). Not a fence: no alert.
    pub(super) fn drop_own_landed(&mut self, f: &Fenced) {
        let dropped = self.drop_work(std::slice::from_ref(&f.partition), "landed_in_doubt");
        tracing::info!(partition = %f.partition, stored = ?f.stored, dropped,
            "this replica's own commit, whose answer was lost, holds the partition's work so far: reading on from it");
    }

    /// After a fence: every table's (and Gold's) progress of `tp` is read again (a claim, tried
    /// now and, while the store refuses, again from a tick) and the partition seeks there;
    /// records until the seek is confirmed are ignored.
    pub(super) async fn reclaim(&mut self, tp: TopicPartition) {
        if let Some(gold) = &mut self.gold {
            gold.release(&tp);
        }
        if let Some(state) = self.parts.get_mut(&tp) {
            state.awaiting_reseek = true;
            state.reclaiming = true;
        }
        self.claims.push_reclaim(vec![tp]);
        self.settle_claims().await;
    }

    /// Reclaimed partitions seek to where the tables and Gold stand.
    fn reseek_reclaimed(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            // Only a partition still waiting for this re-claim (not revoked and assigned again).
            if !self.parts.get(tp).is_some_and(|s| s.reclaiming) {
                continue;
            }
            let after = self.resume_after(tp);
            if let Some(state) = self.parts.get_mut(tp) {
                state.position = after.map(|v| v + 1);
                state.awaiting_reseek = true;
                state.reclaiming = false;
            }
            self.commands
                .send(SourceCommand::Seek(tp.clone(), after.map_or(0, |v| v + 1)));
        }
    }

    /// Where a partition resumes: after what every table holds and what Gold has sent.
    pub(super) fn resume_after(&self, tp: &TopicPartition) -> Option<i64> {
        let tables = self.tables.resume_after(tp)?;
        match self.gold.as_ref().and_then(|g| g.resume_after(tp)) {
            Some(sent) => Some(tables.min(sent)),
            None => Some(tables),
        }
    }
}
