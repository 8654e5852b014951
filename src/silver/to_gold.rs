//! The hand-off from Silver to Gold stage 1: Gold claims the partitions Silver claims, sends its
//! epochs after each Silver commit, and moves idle partitions' watermarks; a fence on the late
//! table is handled like a fence on a Silver table.

use std::collections::HashMap;

use crate::gold::core::watermark::recorded_clock;
use crate::gold::stage1::SilverProgress;
use crate::models::TopicPartition;

use super::pipeline::{PipelineError, Replica};

impl Replica {
    /// Reads Gold's progress of `partitions` once (see `Emitter::claim`).
    pub(super) async fn claim_gold_once(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), crate::lake::commit::CommitError> {
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        let table = &mut self.tables.list[gold.table];
        let mut silver: HashMap<TopicPartition, SilverProgress> = HashMap::new();
        for tp in partitions {
            let committed = table.parts.get(tp).and_then(|p| p.committed);
            // The clock recorded with Silver's latest commit of the partition: an epoch read
            // again is bounded by the same value as when it was first sent.
            let app = table.committer.side_app_id(super::flush::CLOCK, tp);
            let clock = table
                .committer
                .stored(&app)
                .await?
                .zip(committed)
                .and_then(|(version, last)| recorded_clock(version, last));
            silver.insert(tp.clone(), SilverProgress { committed, clock });
        }
        let held = |tp: &TopicPartition| silver.get(tp).copied().unwrap_or_default();
        gold.claim(partitions, &held).await
    }

    /// Sends Gold's queued epochs (after their Silver commit) and waits until they are recorded,
    /// a send in flight included. A fence on the late table drops the partition's work and reads
    /// it again, like a fence on a Silver table.
    pub(super) async fn send_gold(&mut self) -> Result<(), PipelineError> {
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        let fenced = gold.send().await?;
        self.on_gold_fenced(fenced).await
    }

    pub(super) async fn on_gold_fenced(
        &mut self,
        fenced: Vec<crate::lake::commit::Fenced>,
    ) -> Result<(), PipelineError> {
        for f in fenced {
            let tp = f.partition.clone();
            if f.own_commit {
                self.drop_own_landed(&f);
            } else {
                tracing::warn!(partition = %tp, expected = ?f.expected, stored = ?f.stored, "Gold progress moved: another replica owns the partition");
                let dropped = self.drop_work(std::slice::from_ref(&tp), "fenced");
                self.metrics
                    .fenced("gold_late", &tp, f.expected, f.stored, dropped);
                self.summary.fenced_partitions += 1;
            }
            self.reclaim(tp).await;
        }
        Ok(())
    }

    /// Takes in the epochs a flush sent in the background, once they are recorded (or fenced,
    /// or failed: then the replica stalls and the next flush sends them again); then idle source
    /// partitions move Gold's watermark with the clock (see `gold::stage1`).
    pub(super) async fn gold_idle(&mut self) -> Result<(), PipelineError> {
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        match gold.poll().await {
            Ok(fenced) => self.on_gold_fenced(fenced).await?,
            Err(e) => {
                self.stall_on(&e.into());
                return Ok(());
            }
        }
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        // The next offset of each partition with nothing buffered or being re-read.
        let next: HashMap<TopicPartition, Option<i64>> = self
            .parts
            .iter()
            .filter(|(_, s)| s.pending_last.is_none() && !s.awaiting_reseek)
            .map(|(tp, s)| (tp.clone(), s.position))
            .collect();
        let fenced = match gold.idle(&next).await {
            Ok(fenced) => fenced,
            Err(e) => {
                tracing::warn!(error = %e, "moving an idle partition's Gold watermark failed; retrying later");
                return Ok(());
            }
        };
        self.on_gold_fenced(fenced).await
    }
}
