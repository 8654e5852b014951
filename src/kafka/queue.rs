//! A librdkafka queue of the application's own on a consumer's client, for the FFI that
//! rust-rdkafka does not wrap (`kafka::fetch`, `kafka::commits`), and the consumer's group
//! membership ([`in_group`]).

#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// A queue created on a consumer's client. It borrows the consumer, so it is destroyed before
/// the client is.
pub struct OwnQueue<'c> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    client: NonNull<rd::rd_kafka_t>,
    /// Cleared before the queue is destroyed (see [`OwnQueue::wake_by`]).
    woken_by: Option<Wake>,
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
            woken_by: None,
            _consumer: PhantomData,
        })
    }

    /// The queue, alive as long as `self`.
    pub fn queue(&self) -> NonNull<rd::rd_kafka_queue_t> {
        self.queue
    }

    /// Lets `wake` end waits on this queue until the queue is destroyed.
    pub fn wake_by(&mut self, wake: &Wake) {
        wake.set(Some(self.queue));
        self.woken_by = Some(wake.clone());
    }

    /// The client the queue belongs to, alive as long as `self`.
    pub fn client(&self) -> NonNull<rd::rd_kafka_t> {
        self.client
    }
}

impl Drop for OwnQueue<'_> {
    fn drop(&mut self) {
        if let Some(wake) = self.woken_by.take() {
            wake.set(None);
        }
        // SAFETY: the client is still alive (`'c`). librdkafka keeps the queue itself while
        // anything still points at it (a partition routed to it, an answer owed to it), and
        // drops what reaches it after this.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// A consumer's own queue (rebalances, errors, statistics: what `BaseConsumer::poll` serves), to
/// ask how many events wait there. It borrows the consumer, so it is released before the client.
pub struct ConsumerQueue<'c> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> ConsumerQueue<'c> {
    /// `None` if the client has no consumer queue.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>) -> Option<Self> {
        // SAFETY: the client pointer is valid while `consumer` is borrowed; librdkafka returns a
        // handle of our own on the queue (released in `drop`), or null.
        let queue = NonNull::new(unsafe {
            rd::rd_kafka_queue_get_consumer(consumer.client().native_ptr())
        })?;
        Some(Self {
            queue,
            _consumer: PhantomData,
        })
    }

    /// How many events wait.
    pub fn waiting(&self) -> usize {
        // SAFETY: the handle is ours and alive; librdkafka reads the length under the queue's lock.
        unsafe { rd::rd_kafka_queue_length(self.queue.as_ptr()) }
    }
}

impl Drop for ConsumerQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_queue_get_consumer` and is released once.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// Whether the consumer is a member of its group (`rd_kafka_memberid`): librdkafka clears the
/// member id when it leaves, just before it sends the LeaveGroup, and holds none before the first
/// join. A round trip to librdkafka's main thread.
pub fn in_group<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> bool {
    let client = consumer.client().native_ptr();
    // SAFETY: the client pointer is valid while `consumer` is borrowed; librdkafka returns a
    // NUL-terminated copy of its own allocation, or null, and it is freed once with its allocator.
    unsafe {
        let id = rd::rd_kafka_memberid(client);
        if id.is_null() {
            return false;
        }
        let member = *id != 0;
        rd::rd_kafka_mem_free(client, id.cast());
        member
    }
}

/// Ends a wait on an [`OwnQueue`] from any thread (`rd_kafka_queue_yield`): the source thread
/// waits on its fetch queue for records, and a command, a stop or an event on the consumer queue
/// wakes it instead of a timer. Waking before a queue is set, or after it is gone, does nothing;
/// a wake that finds no one waiting ends the next wait at once, so none is lost.
#[derive(Clone, Default)]
pub struct Wake(Arc<Mutex<Option<Waited>>>);

/// The queue a [`Wake`] ends waits on.
struct Waited(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka's queues may be used from any thread; `Wake` clears the pointer (under its
// lock) before the queue is destroyed.
unsafe impl Send for Waited {}

impl Wake {
    /// Ends the current or next wait on the queue.
    pub fn wake(&self) {
        let waited = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = waited.as_ref() {
            // SAFETY: the queue is alive while it is set (see `set`), and the lock is held.
            unsafe { rd::rd_kafka_queue_yield(queue.0.as_ptr()) };
        }
    }

    /// The queue to wake, or none; called by the queue's owner before it destroys the queue.
    fn set(&self, queue: Option<NonNull<rd::rd_kafka_queue_t>>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = queue.map(Waited);
    }
}
