//! Records in batches: librdkafka's `rd_kafka_consume_callback_queue`, which rust-rdkafka does
//! not wrap.
//!
//! rust-rdkafka's `poll` returns one record per call, and every call reads the clock, allocates
//! the reference count of the event that carries the record, and takes the consumer queue's lock
//! and condition variable. Here the source routes each partition it starts to a queue of its own
//! ([`FetchQueue::route`]) and takes up to [`BATCH`] records from it per call, under one lock. The
//! consumer queue keeps everything else: rebalances, errors, statistics and offset commits, still
//! served by `BaseConsumer::poll`, so the rebalance handler runs exactly as before.
//!
//! Why the callback read and not `rd_kafka_consume_batch_queue`: after a batch, that one moves
//! each partition's position to one past the offset of every message in it, consumer errors
//! included (librdkafka 2.12's `rd_kafka_q_serve_rkmessages`). A fetch error carries the offset
//! the fetcher would fetch next, `N`; the position becomes `N + 1`, and the next pause (Strata's
//! for backpressure, or librdkafka's own around a rebalance) restarts fetching there: record `N`
//! would be skipped. The callback read moves the position for records only, as `poll` does
//! (`rd_kafka_fetch_op_app_prepare` returns early for an error), and drops control records and
//! records outdated by a seek before the callback sees them.
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

    /// Waits up to `wait` for a first message, then hands `each` the messages waiting, in order,
    /// up to [`BATCH`] of them; `each` returns false to stop after the one it was given. Returns
    /// how many messages `each` saw. Messages of one partition come in offset order, and each is
    /// given back to librdkafka as soon as `each` returns.
    pub fn read<F: FnMut(Fetched<'_>) -> bool>(&mut self, wait: Duration, each: F) -> usize {
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        let mut reader = Reader {
            each,
            seen: 0,
            client: self.client,
            panic: None,
        };
        // SAFETY: the queue and client are alive (`'c`); `reader` outlives the call, which is the
        // only place librdkafka uses the opaque pointer, and `deliver::<F>` is the callback for
        // exactly this `Reader<F>`.
        unsafe {
            rd::rd_kafka_consume_callback_queue(
                self.queue.as_ptr(),
                wait_ms,
                Some(deliver::<F>),
                std::ptr::from_mut(&mut reader).cast::<c_void>(),
            );
        }
        if let Some(panic) = reader.panic {
            std::panic::resume_unwind(panic);
        }
        reader.seen
    }
}

impl Drop for FetchQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: the client is still alive (`'c`), and no message of this queue is held: each
        // lives only for its callback.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// The state of one [`FetchQueue::read`], reached from librdkafka's callback.
struct Reader<F> {
    each: F,
    seen: usize,
    client: NonNull<rd::rd_kafka_t>,
    /// A panic of `each`, carried across the C frames and resumed after them.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

/// librdkafka's callback for each message of a [`FetchQueue::read`]. It asks librdkafka to stop
/// (`rd_kafka_yield`) once `each` says so, a batch is full or `each` panicked; librdkafka then puts
/// the messages not yet given back at the head of the queue.
unsafe extern "C" fn deliver<F: FnMut(Fetched<'_>) -> bool>(
    message: *mut rd::rd_kafka_message_t,
    opaque: *mut c_void,
) {
    // SAFETY: `opaque` is the `Reader<F>` of the `read` this call is inside (see there), not
    // otherwise borrowed while librdkafka runs.
    let reader = unsafe { &mut *opaque.cast::<Reader<F>>() };
    let more = if reader.panic.is_some() {
        false
    } else if let Some(message) = unsafe { message.as_ref() } {
        // SAFETY (above): librdkafka's message is valid until this callback returns, and
        // `Fetched`'s lifetime cannot leave `each`.
        reader.seen += 1;
        let each = &mut reader.each;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| each(Fetched { message }))) {
            Ok(more) => more,
            Err(panic) => {
                reader.panic = Some(panic);
                false
            }
        }
    } else {
        true
    };
    if !more || reader.seen >= BATCH {
        // SAFETY: the client is alive (`'c` of the queue being read).
        unsafe { rd::rd_kafka_yield(reader.client.as_ptr()) };
    }
}

/// One record (or consumer error) a [`FetchQueue::read`] hands over, for as long as the callback
/// runs.
#[derive(Clone, Copy)]
pub struct Fetched<'b> {
    message: &'b rd::rd_kafka_message_t,
}

impl<'b> Fetched<'b> {
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
        // SAFETY: the message is valid (see `deliver`), and `kind` is a live out-parameter.
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
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    /// Sends records `from..to` to partition 0 of `topic`, each with its number as its value.
    fn produce(producer: &BaseProducer, topic: &str, from: usize, to: usize) {
        for i in from..to {
            let value = i.to_string();
            producer
                .send(
                    BaseRecord::<'_, [u8], [u8]>::to(topic)
                        .partition(0)
                        .payload(value.as_bytes()),
                )
                .map_err(|(e, _)| e)
                .expect("send");
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
    }

    fn producer(brokers: &str) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("producer")
    }

    /// A consumer of `topic`'s partition 0, assigned from the beginning once `route` has routed
    /// it (to a fetch queue of the caller's).
    /// A consumer of `topic`'s partition 0 that reports reaching the end of it as an error
    /// (`PartitionEOF`), so a test can tell when the fetcher has caught up.
    fn consumer(brokers: &str, topic: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", topic)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .create()
            .expect("consumer")
    }

    fn assign_from_start(consumer: &BaseConsumer, topic: &str) {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .expect("partition");
        consumer.assign(&assignment).expect("assign");
    }

    /// Reads until `want` records came and the fetcher reached the end of the partition (or 30 s
    /// passed): their offsets, checked against their values, and the largest number of messages
    /// one read handed over. Fails on any error but the end of the partition.
    fn read_records(
        consumer: &BaseConsumer,
        fetch: &mut FetchQueue<'_>,
        topic: &str,
        want: usize,
    ) -> (Vec<i64>, usize) {
        let mut offsets = Vec::new();
        let mut largest = 0;
        let mut end = false;
        let until = Instant::now() + Duration::from_secs(30);
        while (offsets.len() < want || !end) && Instant::now() < until {
            assert!(
                !matches!(consumer.poll(Duration::ZERO), Some(Ok(_))),
                "a record reached the consumer queue"
            );
            let seen = fetch.read(Duration::from_millis(100), |message| {
                match message.error() {
                    Some(RDKafkaErrorCode::PartitionEOF) => end = true,
                    Some(e) => panic!("error {e:?} at {}", message.offset()),
                    None => {
                        assert_eq!(message.topic(), topic.as_bytes());
                        let value = message
                            .payload()
                            .map(|p| String::from_utf8_lossy(p).into_owned());
                        assert_eq!(value, Some(message.offset().to_string()));
                        offsets.push(message.offset());
                        end = false;
                    }
                }
                true
            });
            largest = largest.max(seen);
        }
        (offsets, largest)
    }

    fn position(consumer: &BaseConsumer, topic: &str) -> Option<Offset> {
        let position = consumer.position().expect("position");
        position.find_partition(topic, 0).map(|p| p.offset())
    }

    /// A routed partition's records come from the fetch queue, many per call but never more than
    /// a batch, in offset order, and none reach the consumer queue.
    #[test]
    fn a_routed_partition_is_read_in_batches() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("routed", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let records = 2 * BATCH + 100;
        produce(&producer(&brokers), "routed", 0, records);

        let consumer = consumer(&brokers, "routed");
        let mut fetch = FetchQueue::new(&consumer).expect("queue");
        assert!(fetch.route("routed", 0));
        assign_from_start(&consumer, "routed");

        let (offsets, largest) = read_records(&consumer, &mut fetch, "routed", records);
        assert_eq!(offsets, (0..records as i64).collect::<Vec<_>>());
        assert!(largest > 1 && largest <= BATCH, "largest batch {largest}");
    }

    /// A fetch error reaches the reader as an error at the offset to fetch next, and leaves the
    /// partition's position there: pausing and resuming right after it restarts at that record,
    /// so none is skipped. (librdkafka's batch read would move the position one past the error.)
    #[test]
    fn a_fetch_error_leaves_the_position_at_the_next_record() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("faulty", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let producer = producer(&brokers);
        produce(&producer, "faulty", 0, 50);

        let consumer = consumer(&brokers, "faulty");
        let mut fetch = FetchQueue::new(&consumer).expect("queue");
        assert!(fetch.route("faulty", 0));
        assign_from_start(&consumer, "faulty");
        // Read to the end of the partition first: librdkafka reports a fetch that fails there
        // for the first time as reaching the end, not as the failure.
        let (offsets, _) = read_records(&consumer, &mut fetch, "faulty", 50);
        assert_eq!(offsets, (0..50).collect::<Vec<_>>());
        assert_eq!(position(&consumer, "faulty"), Some(Offset::Offset(50)));

        // The next fetch fails; the partition is paused and resumed as soon as its error is read.
        cluster.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG],
        );
        let mut error = None;
        let until = Instant::now() + Duration::from_secs(30);
        while error.is_none() && Instant::now() < until {
            let _ = consumer.poll(Duration::ZERO);
            fetch.read(Duration::from_millis(100), |message| {
                assert!(
                    message.error().is_some(),
                    "a record where none was produced"
                );
                error = Some((message.error(), message.offset()));
                false
            });
        }
        assert_eq!(
            error,
            Some((Some(RDKafkaErrorCode::InvalidMessage), 50)),
            "the fetch error, at the offset to fetch next"
        );
        assert_eq!(
            position(&consumer, "faulty"),
            Some(Offset::Offset(50)),
            "the position stays at the record not yet read"
        );
        let list = consumer.assignment().expect("assignment");
        consumer.pause(&list).expect("pause");
        consumer.resume(&list).expect("resume");

        produce(&producer, "faulty", 50, 100);
        let (offsets, _) = read_records(&consumer, &mut fetch, "faulty", 50);
        assert_eq!(
            offsets,
            (50..100).collect::<Vec<_>>(),
            "every record after the error"
        );
    }
}
