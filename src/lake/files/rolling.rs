//! Rolling files: rows are encoded into open Parquet files in the background while the pipeline
//! goes on decoding, so that a flush only finishes them (their last row group, footer and upload)
//! and commits. This is how Flink's file sink works (part files written as records come, committed
//! at a checkpoint). The files stay invisible until the commit references them; a flush that does
//! not take them (an error, a fence, rows dropped) leaves them to vacuum and writes its rows from
//! the buffer, which keeps every row until its commit.

use std::collections::BTreeMap;

use deltalake::arrow::array::RecordBatch;
use deltalake::kernel::Add;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{rows_of, OpenFile, SilverError, SilverWriter};

/// Files open at once: rows of another event hour finish the file of the earliest hour first, so
/// a backlog spread over many hours holds at most this many encoders and upload buffers.
const MAX_OPEN: usize = 4;

/// The background task that encodes and uploads the batches it is handed, in order.
pub struct RollingFiles {
    batches: Option<mpsc::UnboundedSender<RecordBatch>>,
    task: JoinHandle<Result<Vec<Add>, SilverError>>,
}

impl RollingFiles {
    /// Starts the task for files of `writer`'s table and schema.
    pub fn start(writer: SilverWriter) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Self {
            batches: Some(sender),
            task: tokio::spawn(roll(writer, receiver)),
        }
    }

    /// Hands `batch` over (a clone of a buffered batch: its arrays are shared, not copied).
    /// Returns false when the task has ended (it failed): the flush then writes from the buffer.
    pub fn push(&self, batch: RecordBatch) -> bool {
        self.batches
            .as_ref()
            .is_some_and(|sender| sender.send(batch).is_ok())
    }

    /// Finishes every open file and returns all the task wrote.
    pub async fn finish(mut self) -> Result<Vec<Add>, SilverError> {
        self.batches = None;
        (&mut self.task).await?
    }
}

impl Drop for RollingFiles {
    /// Abandoned (its rows are dropped or written again): the files it made are never committed.
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn roll(
    writer: SilverWriter,
    mut batches: mpsc::UnboundedReceiver<RecordBatch>,
) -> Result<Vec<Add>, SilverError> {
    let mut open: BTreeMap<(i32, i32), OpenFile> = BTreeMap::new();
    let mut files = Vec::new();
    // From the first batch: each batch is a source chunk of the same table, alike in width.
    let mut sizing: Option<(usize, usize)> = None;
    let rolled = async {
        while let Some(batch) = batches.recv().await {
            let batch = crate::lake::evolution::conform(&batch, &writer.schema)?;
            if batch.num_rows() == 0 {
                continue;
            }
            let (bytes_per_row, rows_per_file) =
                *sizing.get_or_insert_with(|| writer.sizing(std::slice::from_ref(&batch)));
            for (hour, rows) in writer.hour_rows(&batch)? {
                let mut rest: &[u32] = &rows;
                while !rest.is_empty() {
                    if !open.contains_key(&hour) {
                        if open.len() >= MAX_OPEN {
                            if let Some((_, earliest)) = open.pop_first() {
                                files.push(earliest.finish().await?);
                                crate::failpoint!("after_upload");
                            }
                        }
                        open.insert(hour, writer.open_file(hour.0, hour.1, bytes_per_row)?);
                    }
                    let Some(file) = open.get_mut(&hour) else {
                        continue;
                    };
                    let take = rows_per_file.saturating_sub(file.rows).clamp(1, rest.len());
                    file.write(&rows_of(&batch, &rest[..take])?).await?;
                    rest = &rest[take..];
                    if file.rows >= rows_per_file {
                        if let Some(full) = open.remove(&hour) {
                            files.push(full.finish().await?);
                            crate::failpoint!("after_upload");
                        }
                    }
                }
            }
            // One chunk at a time: the pipeline's task gets its turn between them.
            tokio::task::yield_now().await;
        }
        while let Some((_, file)) = open.pop_first() {
            files.push(file.finish().await?);
            crate::failpoint!("after_upload");
        }
        Ok::<(), SilverError>(())
    }
    .await;
    match rolled {
        Ok(()) => Ok(files),
        Err(e) => {
            for (_, file) in open {
                file.abort().await;
            }
            Err(e)
        }
    }
}
