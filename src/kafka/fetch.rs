//! Records in batches: librdkafka's `rd_kafka_consume_batch_queue`, which rust-rdkafka does not
//! wrap.
//!
//! rust-rdkafka's `poll` returns one record per call, and every call reads the clock, allocates
//! the reference count of the event that carries the record, and takes the consumer queue's lock
//! and condition variable. Here the source routes each partition it starts to a queue of its own
//! ([`FetchQueue::route`]) and takes up to [`BATCH`] records from it per call. The consumer queue
//! keeps everything else: rebalances, errors, statistics and offset commits, still served by
//! `BaseConsumer::poll`, so the rebalance handler runs exactly as before.
//!
//! Reading batches from the consumer queue itself is no option: rust-rdkafka takes rebalances as
//! events, and librdkafka answers a rebalance met inside a batch read with a forced unassign.
//!
//! librdkafka clears a partition's routing when its fetching stops (a revocation), and, the routing
//! being the application's, does not point it back at the consumer queue when fetching starts
//! again. So the source routes a partition every time it starts or seeks it, just before the
//! seek: records fetched before it, wherever they wait, are outdated by the seek and dropped by
//! librdkafka (by their fetch version), and `poll` still returns any record that reached the
//! consumer queue before a partition's first routing.

#![allow(unsafe_code)]

use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;

/// Records taken per call at most.
pub const BATCH: usize = 1_024;

/// A queue of the source's own that the started partitions' records are routed to. It borrows
/// the consumer, so it is destroyed before the client is.
pub struct FetchQueue<'c> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    client: NonNull<rd::rd_kafka_t>,
    messages: Vec<*mut rd::rd_kafka_message_t>,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> FetchQueue<'c> {
    /// A new, empty queue on `consumer`'s client.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>) -> Option<Self> {
        let client = NonNull::new(consumer.client().native_ptr())?;
        // SAFETY: the client pointer is valid while `consumer` is borrowed, which `'c` makes
        // outlast this queue.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(client.as_ptr()) })?;
        Some(Self {
            queue,
            client,
            messages: Vec::with_capacity(BATCH),
            _consumer: PhantomData,
        })
    }

    /// Routes `topic`/`partition`'s fetched records (and its consumer errors) to this queue.
    /// Returns false if the name cannot be passed to librdkafka (it holds a NUL byte).
    pub fn route(&self, topic: &str, partition: i32) -> bool {
        let Ok(name) = CString::new(topic) else {
            return false;
        };
        // SAFETY: the client is alive (see `new`) and `name` is NUL-terminated and outlives the
        // call. librdkafka creates the partition if it does not know it yet and returns a handle
        // of its own on the partition's fetch queue, which is released here; the forwarding stays
        // with the fetch queue (librdkafka marks it as the application's, so starting the
        // partition does not point it back at the consumer queue). Ops already waiting on the
        // fetch queue move over with it.
        unsafe {
            let source =
                rd::rd_kafka_queue_get_partition(self.client.as_ptr(), name.as_ptr(), partition);
            if source.is_null() {
                return false;
            }
            rd::rd_kafka_queue_forward(source, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(source);
        }
        true
    }

    /// Waits up to `wait` for a first record, then takes whatever else is there, up to
    /// [`BATCH`] in all. Records of one partition come in offset order.
    pub fn take(&mut self, wait: Duration) -> Batch<'_, 'c> {
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        self.messages.clear();
        // librdkafka's batch read waits until the batch is full or the time is up, so the wait
        // asks for one record: it returns as soon as that one is there.
        if wait_ms > 0 {
            self.read(wait_ms, 1);
        }
        if self.messages.len() < BATCH {
            self.read(0, BATCH - self.messages.len());
        }
        Batch { queue: self }
    }

    fn read(&mut self, wait_ms: i32, room: usize) {
        let len = self.messages.len();
        // SAFETY: the queue is alive, and `room` slots past `len` are within the vector's
        // capacity (`len + room <= BATCH`). librdkafka writes at most `room` message pointers
        // there and returns how many, or -1 on error (nothing written).
        let read = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                wait_ms,
                self.messages.as_mut_ptr().add(len),
                room,
            )
        };
        if let Ok(read) = usize::try_from(read) {
            // SAFETY: librdkafka initialised `read <= room` slots past `len`.
            unsafe { self.messages.set_len(len + read.min(room)) };
        }
    }
}

impl Drop for FetchQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: the client is still alive (`'c`), and no message of this queue is left: each
        // `Batch` destroys its messages when dropped, and it borrows the queue.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// The records one [`FetchQueue::take`] returned; they are given back to librdkafka when this
/// is dropped, so no view of them outlives it.
pub struct Batch<'q, 'c> {
    queue: &'q mut FetchQueue<'c>,
}

impl Batch<'_, '_> {
    pub fn is_empty(&self) -> bool {
        self.queue.messages.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.messages.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = Fetched<'_>> {
        self.queue.messages.iter().filter_map(|&message| {
            // SAFETY: librdkafka returned a valid message, owned by this batch until it drops.
            unsafe { message.as_ref() }.map(|message| Fetched { message })
        })
    }
}

impl Drop for Batch<'_, '_> {
    fn drop(&mut self) {
        for message in self.queue.messages.drain(..) {
            // SAFETY: each message came from `rd_kafka_consume_batch_queue` and is destroyed
            // once; the views of `iter` borrow this batch, so none is left.
            unsafe { rd::rd_kafka_message_destroy(message) };
        }
    }
}

/// One record (or consumer error) of a [`Batch`].
#[derive(Clone, Copy)]
pub struct Fetched<'b> {
    message: &'b rd::rd_kafka_message_t,
}

impl<'b> Fetched<'b> {
    /// Whether both are of the same topic, without comparing names: both messages hold their
    /// topic handle, so the handles are alive and equal only for the same topic.
    pub fn same_topic(&self, other: &Fetched<'_>) -> bool {
        std::ptr::eq(self.message.rkt, other.message.rkt)
    }

    /// The consumer error this message carries instead of a record (an offset out of range, say).
    pub fn error(&self) -> Option<RDKafkaErrorCode> {
        (self.message.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| self.message.err.into())
    }

    /// The topic's name as librdkafka holds it (a Kafka topic name is ASCII).
    pub fn topic(&self) -> &'b [u8] {
        if self.message.rkt.is_null() {
            return b"";
        }
        // SAFETY: the topic handle is kept alive by the message, and its name is NUL-terminated.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.message.rkt)) }.to_bytes()
    }

    pub fn partition(&self) -> i32 {
        self.message.partition
    }

    pub fn offset(&self) -> i64 {
        self.message.offset
    }

    /// Create or log-append time in milliseconds, as rust-rdkafka's `Timestamp::to_millis`.
    pub fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: the message is valid (see `Batch`), and `kind` is a live out-parameter.
        let millis = unsafe { rd::rd_kafka_message_timestamp(self.message, &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && millis != -1)
            .then_some(millis)
    }

    pub fn key(&self) -> Option<&'b [u8]> {
        bytes(self.message.key, self.message.key_len)
    }

    pub fn payload(&self) -> Option<&'b [u8]> {
        bytes(self.message.payload, self.message.len)
    }

    /// The record's headers, in order: name (lossy UTF-8) and value (`None` for a null value).
    pub fn headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: the message is valid and ours; librdkafka parses its headers once and keeps
        // them with the message (freed with it). `headers` is a live out-parameter.
        let err = unsafe { rd::rd_kafka_message_headers(self.message, &mut headers) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return Vec::new();
        }
        // SAFETY: `headers` is the message's parsed header list, alive as long as the message.
        let count = unsafe { rd::rd_kafka_header_cnt(headers) };
        let mut all = Vec::with_capacity(count);
        for index in 0..count {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: `index < count`; the out-parameters are live. librdkafka points them at the
            // header's NUL-terminated name and its value (null for a null value) of `size` bytes.
            let err = unsafe {
                rd::rd_kafka_header_get_all(headers, index, &mut name, &mut value, &mut size)
            };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                continue;
            }
            // SAFETY: a NUL-terminated name owned by the header list (see above).
            let name = unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            all.push((name, bytes(value.cast_mut(), size).map(<[u8]>::to_vec)));
        }
        all
    }
}

/// `len` bytes at `data`, or `None` for a null pointer.
fn bytes<'b>(data: *mut c_void, len: usize) -> Option<&'b [u8]> {
    if data.is_null() {
        return None;
    }
    // SAFETY: librdkafka gives a non-null pointer to `len` bytes that live as long as the message
    // they belong to, which the caller's lifetime `'b` is bound to.
    Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    use super::*;

    /// A routed partition's records come from the fetch queue, many per call and in offset order,
    /// and none reach the consumer queue.
    #[test]
    fn a_routed_partition_is_read_in_batches() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("routed", 1, 1).expect("topic");
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .expect("producer");
        let records = 2 * BATCH + 100;
        for i in 0..records {
            let value = i.to_string();
            producer
                .send(BaseRecord::<'_, [u8], [u8]>::to("routed").payload(value.as_bytes()))
                .map_err(|(e, _)| e)
                .expect("send");
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(10)).expect("flush");

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "routed")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut fetch = FetchQueue::new(&consumer).expect("queue");
        assert!(fetch.route("routed", 0));
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("routed", 0, Offset::Beginning)
            .expect("partition");
        consumer.assign(&assignment).expect("assign");

        let mut offsets = Vec::new();
        let mut largest = 0;
        let until = Instant::now() + Duration::from_secs(30);
        while offsets.len() < records && Instant::now() < until {
            assert!(
                !matches!(consumer.poll(Duration::ZERO), Some(Ok(_))),
                "a record reached the consumer queue"
            );
            let batch = fetch.take(Duration::from_millis(100));
            let mut taken = 0;
            for message in batch.iter() {
                assert_eq!(message.error(), None);
                assert_eq!(message.topic(), b"routed");
                let value = message
                    .payload()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                assert_eq!(value, Some(message.offset().to_string()));
                offsets.push(message.offset());
                taken += 1;
            }
            largest = largest.max(taken);
        }
        assert_eq!(offsets, (0..records as i64).collect::<Vec<_>>());
        assert!(largest > 1 && largest <= BATCH, "largest batch {largest}");
    }
}
