//! Group offset commits whose answers the source sees: librdkafka's `rd_kafka_commit_queue`,
//! which rust-rdkafka does not wrap.
//!
//! librdkafka answers an asynchronous `rd_kafka_commit` only to an `offset_commit_cb`, and
//! rust-rdkafka's `BaseConsumer` sets none (it asks for events instead), so its
//! `ConsumerContext::commit_callback` never runs for `CommitMode::Async` and a commit's result is
//! lost. Here each commit names a queue of the source's own for its answer: the source learns
//! which commits failed, and how many are still unanswered, which it waits for before leaving its
//! group (`kafka::consumer::leave_group`).

#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use super::queue::OwnQueue;

/// The commits a consumer sent and the queue their answers come back to. It borrows the
/// consumer, so it is destroyed before the client is.
pub struct Commits<'c> {
    own: OwnQueue<'c>,
    in_flight: usize,
}

impl<'c> Commits<'c> {
    /// `None` if librdkafka gives no queue.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>) -> Option<Self> {
        Some(Self {
            own: OwnQueue::new(consumer)?,
            in_flight: 0,
        })
    }

    /// Sends a commit of `offsets` to the group coordinator without waiting for it; its answer
    /// comes back through [`Commits::answers`]. An error here means it was not sent.
    pub fn send(&mut self, offsets: &TopicPartitionList) -> Result<(), RDKafkaErrorCode> {
        // SAFETY: the client and the queue are alive (see `OwnQueue`); librdkafka copies `offsets`
        // before it returns and keeps a reference of its own on the queue until it has answered.
        // Without a callback, the answer is an event on the queue.
        let err = unsafe {
            rd::rd_kafka_commit_queue(
                self.own.client().as_ptr(),
                offsets.ptr(),
                self.own.queue().as_ptr(),
                None,
                std::ptr::null_mut(),
            )
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(err.into());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Commits sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Calls `each` with every answer that came (a commit's error, or `None` when it succeeded),
    /// waiting up to `wait` for the first one.
    pub fn answers(&mut self, wait: Duration, mut each: impl FnMut(Option<RDKafkaErrorCode>)) {
        let mut wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        while self.in_flight > 0 {
            // SAFETY: the queue is alive; the event returned is ours and destroyed below.
            let event = unsafe { rd::rd_kafka_queue_poll(self.own.queue().as_ptr(), wait_ms) };
            let Some(event) = NonNull::new(event) else {
                return;
            };
            wait_ms = 0;
            // SAFETY: `event` is a valid event until it is destroyed, once, at the end.
            unsafe {
                if rd::rd_kafka_event_type(event.as_ptr()) == rd::RD_KAFKA_EVENT_OFFSET_COMMIT {
                    self.in_flight -= 1;
                    let err = rd::rd_kafka_event_error(event.as_ptr());
                    each(
                        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
                            .then(|| err.into()),
                    );
                }
                rd::rd_kafka_event_destroy(event.as_ptr());
            }
        }
    }
}
