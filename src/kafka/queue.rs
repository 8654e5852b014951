//! A librdkafka queue of the application's own on a consumer's client, for the FFI that
//! rust-rdkafka does not wrap (`kafka::fetch`, `kafka::commits`).

#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ptr::NonNull;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// A queue created on a consumer's client. It borrows the consumer, so it is destroyed before
/// the client is.
pub struct OwnQueue<'c> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    client: NonNull<rd::rd_kafka_t>,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> OwnQueue<'c> {
    /// A new, empty queue on `consumer`'s client; `None` if librdkafka gives none.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>) -> Option<Self> {
        let client = NonNull::new(consumer.client().native_ptr())?;
        // SAFETY: the client pointer is valid while `consumer` is borrowed, which `'c` makes
        // outlast this queue.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(client.as_ptr()) })?;
        Some(Self {
            queue,
            client,
            _consumer: PhantomData,
        })
    }

    /// The queue, alive as long as `self`.
    pub fn queue(&self) -> NonNull<rd::rd_kafka_queue_t> {
        self.queue
    }

    /// The client the queue belongs to, alive as long as `self`.
    pub fn client(&self) -> NonNull<rd::rd_kafka_t> {
        self.client
    }
}

impl Drop for OwnQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: the client is still alive (`'c`). librdkafka keeps the queue itself while
        // anything still points at it (a partition routed to it, an answer owed to it), and
        // drops what reaches it after this.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}
