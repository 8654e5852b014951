//! The one consumer event loop, shared by the Silver pipeline and Gold stage 2: events from the
//! consumer thread (records, assignments to answer, revocations to finish), a periodic tick, and
//! shutdown. After shutdown: the events already handed over are handled and everything complete
//! is committed, within the grace period; then the consumer is asked to leave its group and its
//! final revocation is answered (what is left is dropped, not lost: the next owner reads it
//! again from the table), and its thread is joined.
//!
//! A stage only says what each event, each tick and the final commit mean; the order of shutdown
//! is written once, here.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::consumer::{Source, SourceEvent};

/// How often a stage's time-based work runs (flush interval, idle partitions, commits).
pub const TICK: Duration = Duration::from_millis(200);

/// A stage driven by the loop.
pub trait Stage {
    type Error: From<GraceExceeded>;

    /// One event from the consumer.
    fn on_event(&mut self, event: SourceEvent) -> impl Future<Output = Result<(), Self::Error>>;

    /// Every [`TICK`].
    fn on_tick(&mut self) -> impl Future<Output = Result<(), Self::Error>>;

    /// After shutdown and the events already handed over: commit everything complete.
    fn commit_all(&mut self) -> impl Future<Output = Result<(), Self::Error>>;

    /// While the consumer leaves its group: answer what it still asks without doing work.
    fn answer_while_closing(&mut self, event: SourceEvent);

    /// Whether an error of the running loop still lets the stage drain (a shutdown that
    /// interrupted a wait, say); any other error stops the stage without a final commit.
    fn drains_after(_error: &Self::Error) -> bool {
        false
    }
}

/// The drain did not finish within the grace period.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("shutdown did not finish within the grace period of {0:?}")]
pub struct GraceExceeded(pub Duration);

/// Runs `stage` until `shutdown`, then drains it within `grace` (`stopping` is called in
/// between, to report the shutdown), lets the consumer leave its group and joins its thread.
pub async fn run<S: Stage>(
    stage: &mut S,
    source: Source,
    mut events: mpsc::Receiver<SourceEvent>,
    shutdown: &CancellationToken,
    grace: Duration,
    stopping: impl FnOnce(),
) -> Result<(), S::Error> {
    let result = match consume(stage, &mut events, shutdown).await {
        Err(e) if S::drains_after(&e) => Ok(()),
        other => other,
    };
    stopping();
    let deadline = tokio::time::Instant::now() + grace;
    let drained = match result {
        Ok(()) => {
            let drain = async {
                // Records already handed over are handled, so their offsets commit with the rest.
                while let Ok(event) = events.try_recv() {
                    stage.on_event(event).await?;
                }
                stage.commit_all().await
            };
            match tokio::time::timeout_at(deadline, drain).await {
                Ok(drained) => drained,
                Err(_) => Err(GraceExceeded(grace).into()),
            }
        }
        Err(e) => Err(e),
    };
    source.stop();
    let closing = async {
        while let Some(event) = events.recv().await {
            stage.answer_while_closing(event);
        }
    };
    // The source first waits for its offset commits in flight (see `consumer::leave_group`).
    let leave_by = deadline.max(
        tokio::time::Instant::now()
            + Duration::from_secs(2)
            + super::consumer::COMMITS_BEFORE_LEAVING,
    );
    let _ = tokio::time::timeout_at(leave_by, closing).await;
    // Closing the channel unblocks the consumer thread if it still waits to hand something over.
    drop(events);
    let _ = tokio::task::spawn_blocking(move || source.join()).await;
    drained
}

async fn consume<S: Stage>(
    stage: &mut S,
    events: &mut mpsc::Receiver<SourceEvent>,
    shutdown: &CancellationToken,
) -> Result<(), S::Error> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            event = events.recv() => match event {
                Some(event) => stage.on_event(event).await?,
                None => return Ok(()),
            },
            _ = tick.tick() => stage.on_tick().await?,
        }
    }
}
