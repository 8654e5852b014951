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
use tokio_util::sync::CancellationToken;

use super::{rows_of, OpenFile, SilverError, SilverWriter};

/// Files open at once: rows of another event hour finish the file written to least recently
/// first, so a backlog spread over many hours holds at most this many encoders and upload buffers.
const MAX_OPEN: usize = 2;

/// The background task that encodes and uploads the batches it is handed, in order.
pub struct RollingFiles {
    batches: Option<mpsc::UnboundedSender<RecordBatch>>,
    task: JoinHandle<Result<Vec<Add>, SilverError>>,
    /// Set when the files are abandoned: the task aborts its open uploads and ends.
    abandoned: CancellationToken,
}

impl RollingFiles {
    /// Starts the task for files of `writer`'s table and schema.
    pub fn start(writer: SilverWriter) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        let abandoned = CancellationToken::new();
        Self {
            batches: Some(sender),
            task: tokio::spawn(roll(writer, receiver, abandoned.clone())),
            abandoned,
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
    /// Abandoned (its rows are dropped or written again): the files it made are never committed,
    /// and its open multipart uploads are aborted (vacuum never sees an unfinished upload).
    fn drop(&mut self) {
        self.abandoned.cancel();
    }
}

async fn roll(
    writer: SilverWriter,
    mut batches: mpsc::UnboundedReceiver<RecordBatch>,
    abandoned: CancellationToken,
) -> Result<Vec<Add>, SilverError> {
    // Per event hour: the file and when it was last written to (a count of writes).
    let mut open: BTreeMap<(i32, i32), (OpenFile, u64)> = BTreeMap::new();
    let mut writes = 0u64;
    let mut files = Vec::new();
    // Arrow bytes and rows seen so far: the sizing of files and row groups follows their average.
    let (mut seen_bytes, mut seen_rows) = (0usize, 0usize);
    let rolled = async {
        loop {
            let batch = tokio::select! {
                biased;
                () = abandoned.cancelled() => {
                    return Err(SilverError::Io(std::io::Error::other("rolling files abandoned")));
                }
                batch = batches.recv() => match batch {
                    Some(batch) => batch,
                    None => break,
                },
            };
            let batch = crate::lake::evolution::conform(&batch, &writer.schema)?;
            if batch.num_rows() == 0 {
                continue;
            }
            seen_bytes += batch.get_array_memory_size();
            seen_rows += batch.num_rows();
            let (bytes_per_row, rows_per_file) = writer.sizing_for(seen_bytes, seen_rows);
            for (hour, rows) in writer.hour_rows(&batch)? {
                let mut rest: &[u32] = &rows;
                while !rest.is_empty() {
                    if !open.contains_key(&hour) {
                        if open.len() >= MAX_OPEN {
                            let stalest =
                                open.iter().min_by_key(|(_, (_, at))| *at).map(|(h, _)| *h);
                            if let Some((file, _)) = stalest.and_then(|h| open.remove(&h)) {
                                files.push(file.finish().await?);
                                crate::failpoint!("after_upload");
                            }
                        }
                        let file = writer.open_file(
                            hour.0,
                            hour.1,
                            bytes_per_row,
                            Some(&batch),
                            rows_per_file,
                        )?;
                        open.insert(hour, (file, writes));
                    }
                    let Some((file, at)) = open.get_mut(&hour) else {
                        continue;
                    };
                    writes += 1;
                    *at = writes;
                    let take = rows_per_file.saturating_sub(file.rows).clamp(1, rest.len());
                    file.write(&rows_of(&batch, &rest[..take])?).await?;
                    rest = &rest[take..];
                    if file.rows >= rows_per_file {
                        if let Some((full, _)) = open.remove(&hour) {
                            files.push(full.finish().await?);
                            crate::failpoint!("after_upload");
                        }
                    }
                }
            }
            // One chunk at a time: the pipeline's task gets its turn between them.
            tokio::task::yield_now().await;
        }
        while let Some((_, (file, _))) = open.pop_first() {
            files.push(file.finish().await?);
            crate::failpoint!("after_upload");
        }
        Ok::<(), SilverError>(())
    }
    .await;
    match rolled {
        Ok(()) => Ok(files),
        Err(e) => {
            for (_, (file, _)) in open {
                file.abort().await;
            }
            Err(e)
        }
    }
}
