//! The commit protocol: files and consumed offsets become visible together, exactly once.
//!
//! **The rule, written once:** a source offset counts as done only when a Delta commit holding the
//! files with its rows also holds a `txn` action `strata/<group>/<topic>/<partition>` whose version
//! is at least that offset. Nothing else (not the Kafka group offset, not a file on storage) is
//! progress. The group offset is committed afterwards and is advisory, for lag tooling only.
//!
//! Fencing: this replica remembers, per owned partition, the `txn` version it last read or wrote.
//! Before every commit it refreshes the snapshot and compares; a mismatch means another replica
//! owns or owned the partition, and the work is refused. The commit is then made against that
//! same snapshot, so delta-rs's conflict checker rejects it if another `txn` for the same
//! partition lands in between (`ConcurrentTransaction`), and the comparison runs again.

use std::collections::{BTreeMap, HashMap};

use deltalake::arrow::datatypes::Schema;
use deltalake::kernel::transaction::{CommitBuilder, CommitConflictError, TransactionError};
use deltalake::kernel::{Action, Add, MetadataExt, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError};

use crate::lake::evolution::Evolution;
use crate::lake::PARTITION_COLUMNS;
use crate::models::TopicPartition;
use crate::retry::Retry;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("delta table: {0}")]
    Delta(#[from] DeltaTableError),
    #[error("commit lost {0} races in a row")]
    TooManyConflicts(usize),
    #[error("partition {0} is not owned by this replica")]
    NotOwned(TopicPartition),
    #[error("the table cannot take the reader schema's rows: {0}")]
    Schema(String),
}

/// A partition whose stored progress is not what this replica last saw: someone else wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub partition: TopicPartition,
    /// The version this replica expected (`None`: no progress stored).
    pub expected: Option<i64>,
    /// The version actually stored in the table.
    pub stored: Option<i64>,
    /// The stored version is this replica's own commit, whose answer was lost and which was read
    /// from the log only after more work of the partition had been added: the table holds the
    /// work up to `stored`, the caller drops the rest and reads on from there. Another replica
    /// had no part in it, so nothing is alerted.
    pub own_commit: bool,
}

/// What a commit left in doubt turned out to be, once read from the log.
#[derive(Debug)]
enum Settled {
    /// Nothing was in doubt, or the commit is not in the log: compare as usual.
    Nothing,
    /// It landed with exactly the offsets the caller is about to commit: that work is done.
    Exactly(i64),
    /// It landed, and the caller holds more work of these partitions than it did: the caller's
    /// work up to `stored` is in the table already.
    Partly(Vec<Fenced>),
}

/// What [`TableCommitter::check`] found before the caller writes files.
#[derive(Debug)]
pub enum Checked {
    /// Every partition is still this replica's: write and commit.
    Owned,
    /// A commit of exactly these offsets, whose answer was lost earlier, is in the log: the work
    /// is committed, at this version, and must not be written again.
    Landed(i64),
    /// These partitions' work must be dropped (see [`Fenced::own_commit`]).
    Fenced(Vec<Fenced>),
}

#[derive(Debug)]
pub enum CommitOutcome {
    Committed {
        version: i64,
        attempts: usize,
        /// The checkpoint written right after this commit, if one was due.
        checkpoint: Option<i64>,
    },
    /// Nothing was committed: these partitions are fenced; drop their work and commit the rest anew.
    Fenced(Vec<Fenced>),
}

/// One Delta table fed from Kafka partitions, and this replica's view of who owns what.
pub struct TableCommitter {
    table: DeltaTable,
    app_prefix: String,
    /// Last `txn` version read or written per partition this replica owns.
    owned: HashMap<TopicPartition, Option<i64>>,
    max_attempts: usize,
    /// A checkpoint every this many commits (`None`: the table's `delta.checkpointInterval`,
    /// 100 unless set).
    checkpoint_every: Option<u64>,
    /// A commit whose answer was lost and whose outcome could not be read yet.
    in_doubt: Option<InDoubt>,
    /// Stored `txn` versions, kept current from the log.
    txns: Txns,
}

/// The `txn` versions this replica has looked up, as of table version `at`, kept current by
/// reading each new commit of the log once. delta-rs asks the kernel for one app id at a time,
/// and the kernel replays every commit since the last checkpoint for each: with a few dozen
/// commits behind the checkpoint, every flush read hundreds of log files per table, and each
/// file read at once held a JSON decoder of about 3 MiB (a few hundred MiB at the peak,
/// measured with heaptrack). `delta.setTransactionRetentionDuration` is refused
/// (`maintenance::check_txn_retention`), so no stored `txn` expires under this cache.
#[derive(Debug, Default)]
struct Txns {
    at: Option<u64>,
    known: HashMap<String, Option<i64>>,
}

/// Commits behind which the cache starts over (the kernel's lookups then read from the last
/// checkpoint, at most its interval of commits).
const TXNS_FOLLOW_MAX: u64 = 100;

/// The `txn` actions of one commit file (`None` when it does not parse).
fn txn_actions(commit: &[u8]) -> Option<Vec<(String, i64)>> {
    #[derive(serde::Deserialize)]
    struct Line {
        txn: Option<Txn>,
    }
    #[derive(serde::Deserialize)]
    struct Txn {
        #[serde(rename = "appId")]
        app_id: String,
        version: i64,
    }
    let mut out = Vec::new();
    for line in commit.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(txn) = serde_json::from_slice::<Line>(line).ok()?.txn {
            out.push((txn.app_id, txn.version));
        }
    }
    Some(out)
}

/// What a commit with an unknown outcome would have left in the log: its offsets and one of its
/// files (file names are unique, so another writer cannot have committed the same one).
#[derive(Debug, Clone)]
struct InDoubt {
    offsets: BTreeMap<TopicPartition, i64>,
    file: Option<String>,
    /// The other `txn`s of the commit: a commit without files that stores the offsets it had
    /// already (Gold's idle watermark) is told apart from the table as it was only by these.
    extra: Vec<(String, i64)>,
}

impl InDoubt {
    fn of(offsets: &BTreeMap<TopicPartition, i64>, files: &[Add], extra: &[(String, i64)]) -> Self {
        Self {
            offsets: offsets.clone(),
            file: files.first().map(|add| add.path.clone()),
            extra: extra.to_vec(),
        }
    }
}

/// The last path segment: a file's unique name, whatever encoding the log gives its folder.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl TableCommitter {
    /// `group` scopes the `txn` app ids, so two pipelines may feed one table without colliding.
    pub fn new(table: DeltaTable, group: &str, max_attempts: usize) -> Self {
        Self {
            table,
            app_prefix: format!("strata/{group}"),
            owned: HashMap::new(),
            max_attempts: max_attempts.max(1),
            checkpoint_every: None,
            in_doubt: None,
            txns: Txns::default(),
        }
    }

    /// Writes a checkpoint every `every` commits instead of the table's own interval.
    pub fn with_checkpoint_interval(mut self, every: Option<u64>) -> Self {
        self.checkpoint_every = every.filter(|n| *n > 0);
        self
    }

    /// After committing `version`: writes a checkpoint when one is due, so that start-up, snapshot
    /// refreshes and `txn` lookups read a checkpoint and at most an interval of commits, however
    /// long the table has lived. Only the writer of a version checkpoints it, so replicas never
    /// race for one. A checkpoint that fails costs speed, not data: it is logged and the next
    /// one is tried on time.
    async fn checkpoint_if_due(&mut self, version: i64) -> Option<i64> {
        let every = match self.checkpoint_every {
            Some(every) => every,
            None => self
                .table
                .snapshot()
                .ok()?
                .table_config()
                .checkpoint_interval()
                .get(),
        };
        let Ok(version_u) = u64::try_from(version) else {
            return None;
        };
        if (version_u + 1) % every != 0 {
            return None;
        }
        // The table state at exactly `version` (another replica may have committed after it).
        let written = async {
            self.table.update_incremental(Some(version_u)).await?;
            deltalake::checkpoints::create_checkpoint(&self.table, None).await
        };
        match written.await {
            Ok(()) => {
                tracing::info!(version, "checkpoint written");
                Some(version)
            }
            Err(e) => {
                tracing::warn!(version, error = %e, "writing a checkpoint failed; the next one is tried on time");
                None
            }
        }
    }

    pub fn app_id(&self, tp: &TopicPartition) -> String {
        format!("{}/{}/{}", self.app_prefix, tp.topic, tp.partition)
    }

    async fn refresh(&mut self) -> Result<(), DeltaTableError> {
        self.table.update_incremental(None).await
    }

    /// Whether the commit `doubt` describes is in the log (read fresh); the table version if so.
    /// One of its files among the table's files proves it (file names are unique). Without one
    /// (a commit without files, or its file compacted away since), its `txn`s decide: those of
    /// partitions this replica still owns (a released one may have moved on under its new
    /// owner) and its other `txn`s, at least one of them.
    async fn landed(&mut self, doubt: &InDoubt) -> Result<Option<i64>, DeltaTableError> {
        self.refresh().await?;
        let version = self.table.version().and_then(|v| i64::try_from(v).ok());
        if let Some(file) = &doubt.file {
            let snapshot = self.table.snapshot()?;
            if snapshot
                .log_data()
                .into_iter()
                .any(|f| file_name(&f.path()) == file_name(file))
            {
                return Ok(version);
            }
        }
        let mut checked = 0;
        for (tp, offset) in &doubt.offsets {
            if !self.owned.contains_key(tp) {
                continue;
            }
            if self.stored_version(tp).await? != Some(*offset) {
                return Ok(None);
            }
            checked += 1;
        }
        for (app_id, stored) in &doubt.extra {
            if self.stored(app_id).await? != Some(*stored) {
                return Ok(None);
            }
            checked += 1;
        }
        Ok(if checked > 0 { version } else { None })
    }

    /// Settles a commit left in doubt before anything else is compared: when it landed, it is
    /// this replica's own progress, never a fence. When it landed with exactly `last_offsets`
    /// and `extra`, the caller's commit is done; otherwise its partitions are reported
    /// (`Partly`), so no row of it is committed twice and no other `txn` of the caller's is
    /// taken as stored.
    async fn settle_in_doubt(
        &mut self,
        last_offsets: &BTreeMap<TopicPartition, i64>,
        extra: &[(String, i64)],
    ) -> Result<Settled, DeltaTableError> {
        let Some(doubt) = self.in_doubt.clone() else {
            return Ok(Settled::Nothing);
        };
        let landed = self.landed(&doubt).await?;
        self.in_doubt = None;
        let Some(version) = landed else {
            tracing::debug!("the commit in doubt is not in the log");
            return Ok(Settled::Nothing);
        };
        tracing::warn!(
            version,
            "a commit whose answer was lost is in the log: it counts as committed"
        );
        if doubt.offsets == *last_offsets && doubt.extra == extra {
            for (tp, offset) in &doubt.offsets {
                self.owned.insert(tp.clone(), Some(*offset));
            }
            return Ok(Settled::Exactly(version));
        }
        // Every partition of it this replica still owns is reported, whether or not the caller
        // commits it now: its baseline moves, and whatever the caller holds of it (rows landed
        // or read again from an older position) must be dropped and read on from the table.
        let mut partly = Vec::new();
        for (tp, offset) in &doubt.offsets {
            // A partition released meanwhile stays released.
            let Some(expected) = self.owned.get_mut(tp) else {
                continue;
            };
            let before = expected.replace(*offset);
            partly.push(Fenced {
                partition: tp.clone(),
                expected: before,
                stored: Some(*offset),
                own_commit: true,
            });
        }
        Ok(Settled::Partly(partly))
    }

    /// A second progress value stored per partition beside its offset (Gold keeps a watermark).
    pub fn side_app_id(&self, name: &str, tp: &TopicPartition) -> String {
        format!("{}/{name}/{}/{}", self.app_prefix, tp.topic, tp.partition)
    }

    async fn stored_version(
        &mut self,
        tp: &TopicPartition,
    ) -> Result<Option<i64>, DeltaTableError> {
        self.stored(&self.app_id(tp)).await
    }

    /// The `txn` version stored under `app_id` in the snapshot last read.
    pub async fn stored(&mut self, app_id: &str) -> Result<Option<i64>, DeltaTableError> {
        self.follow_txns().await?;
        if let Some(version) = self.txns.known.get(app_id) {
            return Ok(*version);
        }
        let snapshot = self.table.snapshot()?;
        let version = snapshot
            .transaction_version(self.table.log_store().as_ref(), app_id)
            .await?;
        self.txns.known.insert(app_id.to_string(), version);
        Ok(version)
    }

    /// Brings the `txn` cache to the snapshot last read: the commits since the cache's version
    /// are read once each. When it cannot follow (too far behind, a commit file gone or not
    /// parsed, the snapshot older than the cache), it starts over empty at the snapshot's version.
    async fn follow_txns(&mut self) -> Result<(), DeltaTableError> {
        let Some(current) = self.table.version() else {
            return Ok(());
        };
        let from = match self.txns.at {
            Some(at) if at == current => return Ok(()),
            Some(at) if at < current && current - at <= TXNS_FOLLOW_MAX => at + 1,
            _ => {
                self.txns = Txns {
                    at: Some(current),
                    known: HashMap::new(),
                };
                return Ok(());
            }
        };
        let log_store = self.table.log_store();
        for version in from..=current {
            let actions = match log_store.read_commit_entry(version).await? {
                Some(commit) => txn_actions(&commit),
                None => None,
            };
            let Some(actions) = actions else {
                tracing::debug!(
                    version,
                    "a commit cannot be followed; txn lookups start over"
                );
                self.txns = Txns {
                    at: Some(current),
                    known: HashMap::new(),
                };
                return Ok(());
            };
            for (app_id, stored) in actions {
                self.txns.known.insert(app_id, Some(stored));
            }
        }
        self.txns.at = Some(current);
        Ok(())
    }

    pub fn object_store(&self) -> std::sync::Arc<dyn deltalake::ObjectStore> {
        self.table.object_store()
    }

    /// Takes ownership of newly assigned partitions: reads their stored progress, remembers it as
    /// the fencing baseline and returns it (the consumer resumes at `stored + 1`).
    pub async fn claim(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, Option<i64>)>, CommitError> {
        self.refresh().await?;
        let mut out = Vec::with_capacity(partitions.len());
        for tp in partitions {
            let stored = self.stored_version(tp).await?;
            self.owned.insert(tp.clone(), stored);
            out.push((tp.clone(), stored));
        }
        Ok(out)
    }

    /// Forgets partitions that were revoked or fenced: their work can no longer commit here.
    pub fn release(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.owned.remove(tp);
        }
    }

    /// Before writing files for `last_offsets`: settles a commit left in doubt, then refreshes
    /// the snapshot and compares each partition's stored progress with what this replica
    /// expects, so fenced work costs no upload and work that landed is not written twice.
    pub async fn check(
        &mut self,
        last_offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<Checked, CommitError> {
        self.check_with(last_offsets, &[]).await
    }

    /// [`TableCommitter::check`] before a [`TableCommitter::commit_with`] of the same `extra`
    /// `txn`s: a commit in doubt landed exactly only if it stored them too.
    pub async fn check_with(
        &mut self,
        last_offsets: &BTreeMap<TopicPartition, i64>,
        extra: &[(String, i64)],
    ) -> Result<Checked, CommitError> {
        match self.settle_in_doubt(last_offsets, extra).await? {
            Settled::Exactly(version) => return Ok(Checked::Landed(version)),
            Settled::Partly(fenced) if !fenced.is_empty() => return Ok(Checked::Fenced(fenced)),
            Settled::Partly(_) | Settled::Nothing => {}
        }
        self.refresh().await?;
        let partitions: Vec<TopicPartition> = last_offsets.keys().cloned().collect();
        let fenced = self.compare(&partitions).await?;
        Ok(if fenced.is_empty() {
            Checked::Owned
        } else {
            Checked::Fenced(fenced)
        })
    }

    async fn compare(&mut self, partitions: &[TopicPartition]) -> Result<Vec<Fenced>, CommitError> {
        let mut fenced = Vec::new();
        for tp in partitions {
            let Some(expected) = self.owned.get(tp).copied() else {
                return Err(CommitError::NotOwned(tp.clone()));
            };
            let stored = self.stored_version(tp).await?;
            if stored != expected {
                fenced.push(Fenced {
                    partition: tp.clone(),
                    expected,
                    stored,
                    own_commit: false,
                });
            }
        }
        Ok(fenced)
    }

    /// Commits `files` and the last offsets they include, as one Delta version, if and only if
    /// every partition's stored progress is still what this replica expects.
    pub async fn commit(
        &mut self,
        files: Vec<Add>,
        last_offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<CommitOutcome, CommitError> {
        self.commit_with(files, last_offsets, &[]).await
    }

    /// [`TableCommitter::commit`] with more `txn` actions (`(app id, version)`) in the same commit.
    pub async fn commit_with(
        &mut self,
        files: Vec<Add>,
        last_offsets: &BTreeMap<TopicPartition, i64>,
        extra: &[(String, i64)],
    ) -> Result<CommitOutcome, CommitError> {
        let partitions: Vec<TopicPartition> = last_offsets.keys().cloned().collect();
        let mut retry = Retry::commit_races();
        for attempt in 1..=self.max_attempts {
            match self.settle_in_doubt(last_offsets, extra).await? {
                Settled::Exactly(version) => {
                    return Ok(CommitOutcome::Committed {
                        version,
                        attempts: attempt,
                        checkpoint: None,
                    })
                }
                Settled::Partly(fenced) if !fenced.is_empty() => {
                    return Ok(CommitOutcome::Fenced(fenced))
                }
                Settled::Partly(_) | Settled::Nothing => {}
            }
            self.refresh().await?;
            let fenced = self.compare(&partitions).await?;
            if !fenced.is_empty() {
                return Ok(CommitOutcome::Fenced(fenced));
            }
            let now = chrono::Utc::now().timestamp_millis();
            let mut actions: Vec<Action> = files.iter().cloned().map(Action::Add).collect();
            actions.extend(last_offsets.iter().map(|(tp, offset)| {
                Action::Txn(Transaction::new_with_last_update(
                    self.app_id(tp),
                    *offset,
                    Some(now),
                ))
            }));
            actions.extend(extra.iter().map(|(app_id, version)| {
                Action::Txn(Transaction::new_with_last_update(
                    app_id.clone(),
                    *version,
                    Some(now),
                ))
            }));
            let operation = DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: Some(PARTITION_COLUMNS.iter().map(|c| c.to_string()).collect()),
                predicate: None,
            };
            let snapshot = self.table.snapshot()?;
            // No retries inside delta-rs: after a lost race we must compare again before retrying.
            let result = CommitBuilder::default()
                .with_actions(actions)
                .with_max_retries(0)
                .build(Some(snapshot), self.table.log_store(), operation)
                .await;
            // The kill tests' model of a store whose answer to the commit's PUT is lost.
            #[cfg(feature = "failpoints")]
            let result = match result {
                Ok(_) if crate::failpoints::fires("commit_answer_lost") => {
                    Err(DeltaTableError::from(TransactionError::LogStoreError {
                        msg: "failpoint commit_answer_lost: the answer to the PUT was lost".into(),
                        source: "failpoint".into(),
                    }))
                }
                other => other,
            };
            match result {
                Ok(done) => {
                    let version = done.version();
                    for (tp, offset) in last_offsets {
                        self.owned.insert(tp.clone(), Some(*offset));
                    }
                    let checkpoint = self.checkpoint_if_due(version as i64).await;
                    return Ok(CommitOutcome::Committed {
                        version: version as i64,
                        attempts: attempt,
                        checkpoint,
                    });
                }
                Err(e) if is_lost_race(&e) => {
                    tracing::debug!(attempt, error = %e, "delta commit lost a race; comparing again");
                    // A store that retried our PUT after losing its answer reports our own
                    // commit as the version that already exists: settled first thing next round.
                    self.in_doubt = Some(InDoubt::of(last_offsets, &files, extra));
                    retry.wait().await;
                }
                Err(e) => {
                    // The PUT may have succeeded and only its answer been lost: read the log
                    // before judging, so our own commit is never taken for another's (a false
                    // fence). When the log cannot be read now, the next commit settles it first.
                    self.in_doubt = Some(InDoubt::of(last_offsets, &files, extra));
                    tracing::warn!(error = %e, "delta commit failed; reading the log for its outcome");
                    match self.settle_in_doubt(last_offsets, extra).await {
                        // `last_offsets` are the doubt's own, so it landed exactly or not at all.
                        Ok(Settled::Exactly(version)) => {
                            let checkpoint = self.checkpoint_if_due(version).await;
                            return Ok(CommitOutcome::Committed {
                                version,
                                attempts: attempt,
                                checkpoint,
                            });
                        }
                        Ok(Settled::Partly(_) | Settled::Nothing) => return Err(e.into()),
                        Err(read) => {
                            // Still in doubt (`settle_in_doubt` keeps it when the log cannot be
                            // read): the next commit settles it first.
                            tracing::warn!(error = %read, "the log cannot be read now; the next commit settles the outcome first");
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        Err(CommitError::TooManyConflicts(self.max_attempts))
    }
}

impl TableCommitter {
    /// Makes the table able to hold `rows` (a reader's decoded rows): columns it lacks are added,
    /// nullable, in one metadata commit. Replicas may race to do it; the loser re-plans against the
    /// winner's schema. Returns the schema files must have from now on.
    pub async fn evolve(&mut self, rows: &Schema) -> Result<Evolution, CommitError> {
        let mut retry = Retry::commit_races();
        for _ in 0..self.max_attempts {
            self.refresh().await?;
            let snapshot = self.table.snapshot()?;
            let plan = crate::lake::evolution::plan_evolution(&snapshot.schema(), rows)
                .map_err(|e| CommitError::Schema(e.to_string()))?;
            if plan.added.is_empty() {
                return Ok(plan);
            }
            let mut fields: Vec<_> = snapshot.schema().fields().cloned().collect();
            fields.extend(plan.added.iter().cloned());
            let schema = deltalake::kernel::StructType::try_new(fields)
                .map_err(|e| CommitError::Schema(e.to_string()))?;
            let metadata = snapshot
                .metadata()
                .clone()
                .with_schema(&schema)
                .map_err(|e| CommitError::Schema(e.to_string()))?;
            let operation = DeltaOperation::AddColumn {
                fields: plan.added.clone(),
            };
            let result = CommitBuilder::default()
                .with_actions(vec![Action::Metadata(metadata)])
                .with_max_retries(0)
                .build(Some(snapshot), self.table.log_store(), operation)
                .await;
            match result {
                Ok(done) => {
                    let added: Vec<&String> = plan.added.iter().map(|f| f.name()).collect();
                    tracing::info!(version = done.version(), ?added, "table schema evolved");
                    self.refresh().await?;
                    return Ok(plan);
                }
                Err(e) if is_lost_race(&e) => {
                    retry.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CommitError::TooManyConflicts(self.max_attempts))
    }
}

/// Errors after which comparing again and retrying is right: another writer committed first.
pub(crate) fn is_lost_race(error: &DeltaTableError) -> bool {
    match error {
        DeltaTableError::VersionAlreadyExists(_) => true,
        DeltaTableError::Transaction { source } => matches!(
            source,
            TransactionError::VersionAlreadyExists(_)
                | TransactionError::MaxCommitAttempts(_)
                | TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction)
                | TransactionError::CommitConflict(CommitConflictError::ConcurrentAppend)
                | TransactionError::CommitConflict(CommitConflictError::MetadataChanged)
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::datatypes::{DataType, Field};

    /// A committer of the local table in `dir` (made if missing).
    async fn committer_on(dir: &std::path::Path) -> TableCommitter {
        crate::lake::register_object_stores();
        let url = url::Url::from_directory_path(dir).expect("url");
        let schema = Schema::new(vec![Field::new("x", DataType::Int64, true)]);
        let table = crate::lake::open_or_create(url, &schema, "t")
            .await
            .expect("table");
        TableCommitter::new(table, "g", 5)
    }

    /// A committer of a new local table that has claimed `orders/0` (keep the directory).
    async fn claimed_on_a_local_table() -> (tempfile::TempDir, TableCommitter, TopicPartition) {
        let dir = tempfile::tempdir().expect("dir");
        let mut committer = committer_on(dir.path()).await;
        let tp = TopicPartition::new("orders", 0);
        committer
            .claim(std::slice::from_ref(&tp))
            .await
            .expect("claim");
        (dir, committer, tp)
    }

    /// A commit in doubt that stores the offsets the table already has (Gold's idle watermark
    /// commit: same offset, new watermark) landed only if its other `txn`s are stored too. Before,
    /// losing a race with another replica made such a commit count as landed while its watermark
    /// never reached the table.
    #[tokio::test]
    async fn a_commit_in_doubt_landed_only_if_its_other_txns_are_stored() {
        let (_dir, mut committer, tp) = claimed_on_a_local_table().await;
        let offsets: BTreeMap<TopicPartition, i64> = [(tp.clone(), 5)].into();
        let watermark = committer.side_app_id("watermark", &tp);
        let outcome = committer
            .commit_with(Vec::new(), &offsets, &[(watermark.clone(), 100)])
            .await
            .expect("commit");
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));

        // The same offset with a newer watermark, whose outcome is unknown and which did not land.
        committer.in_doubt = Some(InDoubt::of(&offsets, &[], &[(watermark.clone(), 200)]));
        assert!(
            matches!(
                committer
                    .settle_in_doubt(&offsets, &[(watermark.clone(), 200)])
                    .await
                    .expect("settle"),
                Settled::Nothing
            ),
            "a commit whose watermark is not stored did not land"
        );
        // One that did land is recognised.
        committer.in_doubt = Some(InDoubt::of(&offsets, &[], &[(watermark.clone(), 100)]));
        assert!(matches!(
            committer
                .settle_in_doubt(&offsets, &[(watermark.clone(), 100)])
                .await
                .expect("settle"),
            Settled::Exactly(_)
        ));
    }

    /// A committer whose commit of `offset` landed while its answer was lost: the log has it,
    /// the committer still expects `before` and holds the commit in doubt.
    async fn answer_lost(committer: &mut TableCommitter, tp: &TopicPartition, offset: i64) {
        let before = committer.owned.get(tp).copied().flatten();
        let offsets: BTreeMap<TopicPartition, i64> = [(tp.clone(), offset)].into();
        let outcome = committer
            .commit(Vec::new(), &offsets)
            .await
            .expect("commit");
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        committer.owned.insert(tp.clone(), before);
        committer.in_doubt = Some(InDoubt::of(&offsets, &[], &[]));
    }

    /// A commit in doubt that the log could not be read for right away (the store went away with
    /// its answer) is settled by the next check: its own commit is never a fence. Before, `check`
    /// compared without settling and reported the replica's own commit as another's.
    #[tokio::test]
    async fn a_check_settles_a_commit_in_doubt_before_comparing() {
        let (_dir, mut committer, tp) = claimed_on_a_local_table().await;

        // The same work again: it is done, not written twice and not fenced.
        answer_lost(&mut committer, &tp, 9).await;
        let same: BTreeMap<TopicPartition, i64> = [(tp.clone(), 9)].into();
        let checked = committer.check(&same).await.expect("check");
        assert!(
            matches!(checked, Checked::Landed(_)),
            "expected the landed commit, got {checked:?}"
        );
        assert!(matches!(
            committer.check(&same).await.expect("check"),
            Checked::Owned
        ));

        // More work of the partition since: the landed part is reported as the replica's own.
        answer_lost(&mut committer, &tp, 12).await;
        let more: BTreeMap<TopicPartition, i64> = [(tp.clone(), 15)].into();
        match committer.check(&more).await.expect("check") {
            Checked::Fenced(fenced) => assert_eq!(
                fenced,
                vec![Fenced {
                    partition: tp.clone(),
                    expected: Some(9),
                    stored: Some(12),
                    own_commit: true,
                }]
            ),
            other => panic!("expected the replica's own commit, got {other:?}"),
        }

        // A commit that meets its own landed predecessor in doubt never commits its rows twice.
        answer_lost(&mut committer, &tp, 20).await;
        let beyond: BTreeMap<TopicPartition, i64> = [(tp.clone(), 25)].into();
        match committer.commit(Vec::new(), &beyond).await.expect("commit") {
            CommitOutcome::Fenced(fenced) => {
                assert!(fenced.iter().all(|f| f.own_commit && f.stored == Some(20)));
            }
            other => panic!("expected the replica's own commit, got {other:?}"),
        }
        assert_eq!(committer.stored_version(&tp).await.expect("read"), Some(20));
    }

    /// The `txn` cache follows every writer's commits: a lookup made once stays right after
    /// another committer moves the partition (a few commits behind, through checkpoints, and more
    /// than `TXNS_FOLLOW_MAX` behind, where it starts over), and the log files it reads are
    /// parsed for `txn` actions only.
    #[tokio::test]
    async fn stored_txns_follow_other_writers_commits() {
        let dir = tempfile::tempdir().expect("dir");
        let mut watcher = committer_on(dir.path())
            .await
            .with_checkpoint_interval(Some(7));
        let mut writer = committer_on(dir.path())
            .await
            .with_checkpoint_interval(Some(7));
        let tp = TopicPartition::new("orders", 0);
        let other = TopicPartition::new("orders", 1);
        let both = [tp.clone(), other.clone()];
        watcher.claim(&both).await.expect("claim");
        writer.claim(&both).await.expect("claim");
        let mut offset = 0;
        for round in [3, 20, TXNS_FOLLOW_MAX as i64 + 5] {
            for _ in 0..round {
                offset += 1;
                let offsets: BTreeMap<TopicPartition, i64> =
                    [(tp.clone(), offset), (other.clone(), offset * 2)].into();
                let outcome = writer.commit(Vec::new(), &offsets).await.expect("commit");
                assert!(matches!(outcome, CommitOutcome::Committed { .. }));
            }
            watcher.refresh().await.expect("refresh");
            assert_eq!(
                watcher.stored_version(&tp).await.expect("read"),
                Some(offset)
            );
            assert_eq!(
                watcher.stored_version(&other).await.expect("read"),
                Some(offset * 2)
            );
        }
        assert_eq!(
            txn_actions(b"{\"txn\":{\"appId\":\"a\",\"version\":4,\"lastUpdated\":1}}\n{\"add\":{\"path\":\"f\"}}\n"),
            Some(vec![("a".to_string(), 4)])
        );
        assert_eq!(txn_actions(b"{not json"), None);
    }

    /// A landed commit in doubt reports every partition of it this replica still owns, also one
    /// the caller does not commit now (a seek back may hold it at an older position: its rows
    /// would be committed twice), and a partition released since, which its new owner moved on,
    /// does not keep the commit from being recognised.
    #[tokio::test]
    async fn a_landed_commit_in_doubt_reports_every_partition_it_holds() {
        let (dir, mut committer, tp) = claimed_on_a_local_table().await;
        let other = TopicPartition::new("orders", 1);
        let gone = TopicPartition::new("orders", 2);
        committer
            .claim(&[other.clone(), gone.clone()])
            .await
            .expect("claim");
        let offsets: BTreeMap<TopicPartition, i64> =
            [(tp.clone(), 10), (other.clone(), 20), (gone.clone(), 30)].into();
        let outcome = committer
            .commit(Vec::new(), &offsets)
            .await
            .expect("commit");
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
        for p in offsets.keys() {
            committer.owned.insert(p.clone(), None);
        }
        committer.in_doubt = Some(InDoubt::of(&offsets, &[], &[]));
        committer.release(std::slice::from_ref(&gone));
        // The new owner of `gone` commits past it.
        let mut next_owner = committer_on(dir.path()).await;
        next_owner
            .claim(std::slice::from_ref(&gone))
            .await
            .expect("claim");
        let moved: BTreeMap<TopicPartition, i64> = [(gone.clone(), 40)].into();
        let outcome = next_owner.commit(Vec::new(), &moved).await.expect("commit");
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));

        let now: BTreeMap<TopicPartition, i64> = [(tp.clone(), 12)].into();
        match committer.check(&now).await.expect("check") {
            Checked::Fenced(mut fenced) => {
                fenced.sort_by_key(|f| f.partition.partition);
                let seen: Vec<(i32, Option<i64>, bool)> = fenced
                    .iter()
                    .map(|f| (f.partition.partition, f.stored, f.own_commit))
                    .collect();
                assert_eq!(seen, vec![(0, Some(10), true), (1, Some(20), true)]);
            }
            other => panic!("expected the replica's own commit, got {other:?}"),
        }
    }
}
