//! Records in batches: librdkafka's `rd_kafka_consume_batch_queue`, which rust-rdkafka does not
//! wrap.
//!
//! rust-rdkafka's `poll` returns one record per call, and every call reads the clock, allocates
//! the reference count of the event that carries the record, and takes the consumer queue's lock
//! and condition variable. Here the source routes each partition it starts to a queue of its own
//! ([`FetchQueue::route`]) and takes up to [`BATCH`] messages from it per call. The consumer
//! queue keeps everything else: rebalances, errors, statistics and offset commits, still served
//! by `BaseConsumer::poll`, so the rebalance handler runs exactly as before.
//!
//! **What a batch read does to positions.** After a batch, librdkafka (2.12,
//! `rd_kafka_q_serve_rkmessages`) moves each partition's position to one past the offset of
//! every message in it, consumer errors included. A fetch error carries the offset the fetcher
//! would fetch next, `N`, so the position becomes `N + 1` while record `N` is still unread; the
//! next pause (Strata's, or librdkafka's own around every rebalance) would restart fetching
//! there and skip record `N`. The source sees every such error in the batch, and puts the
//! position back (`kafka::consumer::put_back`). librdkafka issue #4844 is the same flaw for
//! end-of-partition messages, which the source turns off.
//!
//! Why not the callback read (`rd_kafka_consume_callback_queue`), which moves positions for
//! records only: it hands control records (transaction markers) to librdkafka's own handling
//! before it checks whether they are outdated by a pause or a seek, and that handling moves the
//! position to the marker's offset + 1. A marker fetched before a pause would then move the
//! position past records not read yet, and the source never sees it. The batch read drops
//! outdated messages, markers included, first.
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
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;

use super::queue::{OwnQueue, Wake};

/// Records taken per call at most.
pub const BATCH: usize = 1_024;

/// A queue of the source's own that the started partitions' records are routed to. It borrows
/// the consumer, so it is destroyed before the client is.
pub struct FetchQueue<'c> {
    own: OwnQueue<'c>,
    messages: Vec<*mut rd::rd_kafka_message_t>,
}

impl<'c> FetchQueue<'c> {
    /// A new, empty queue on `consumer`'s client.
    pub fn new<C: ConsumerContext>(consumer: &'c BaseConsumer<C>) -> Option<Self> {
        Some(Self {
            own: OwnQueue::new(consumer)?,
            messages: Vec::with_capacity(BATCH),
        })
    }

    /// Lets `wake` end [`FetchQueue::read`]'s waits from any thread, until this queue is gone.
    pub fn wake_by(&mut self, wake: &Wake) {
        self.own.wake_by(wake);
    }

    /// Routes `topic`/`partition`'s fetched records (and its consumer errors) to this queue.
    /// Returns false if the name cannot be passed to librdkafka (it holds a NUL byte).
    pub fn route(&self, topic: &str, partition: i32) -> bool {
        let Ok(name) = CString::new(topic) else {
            return false;
        };
        // SAFETY: the client is alive (see `OwnQueue`) and `name` is NUL-terminated and outlives the
        // call. librdkafka creates the partition if it does not know it yet and returns a handle
        // of its own on the partition's fetch queue, which is released here; the forwarding stays
        // with the fetch queue (librdkafka marks it as the application's, so starting the
        // partition does not point it back at the consumer queue). Ops already waiting on the
        // fetch queue move over with it.
        unsafe {
            let source = rd::rd_kafka_queue_get_partition(
                self.own.client().as_ptr(),
                name.as_ptr(),
                partition,
            );
            if source.is_null() {
                return false;
            }
            rd::rd_kafka_queue_forward(source, self.own.queue().as_ptr());
            rd::rd_kafka_queue_destroy(source);
        }
        true
    }

    /// Waits up to `wait` for a first message (a [`Wake`] ends the wait early), then takes
    /// whatever else is there, up to [`BATCH`] in all, and hands each to `each`, in order;
    /// returns how many. Messages of one partition come in offset order. Every message taken is
    /// handed over (librdkafka has moved the positions already), and each is given back to
    /// librdkafka after the last.
    pub fn read<F: FnMut(Fetched<'_>)>(&mut self, wait: Duration, mut each: F) -> usize {
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        let mut batch = Batch {
            messages: &mut self.messages,
        };
        batch.messages.clear();
        // librdkafka's batch read waits until the batch is full or the time is up, so the wait
        // asks for one message: it returns as soon as that one is there.
        if wait_ms > 0 {
            batch.take(self.own.queue(), wait_ms, 1);
        }
        let room = BATCH - batch.messages.len();
        if room > 0 {
            batch.take(self.own.queue(), 0, room);
        }
        for &message in batch.messages.iter() {
            // SAFETY: librdkafka returned a valid message, owned by `batch` until it drops, after
            // this loop; `Fetched`'s lifetime cannot leave `each`.
            if let Some(view) = unsafe { message.as_ref() } {
                each(Fetched {
                    message: view,
                    whole: message.cast_const(),
                });
            }
        }
        batch.messages.len()
    }
}

/// The messages one [`FetchQueue::read`] took; given back to librdkafka when this drops, also
/// when the reader panics.
struct Batch<'m> {
    messages: &'m mut Vec<*mut rd::rd_kafka_message_t>,
}

impl Batch<'_> {
    /// Takes up to `room` more messages, waiting up to `wait_ms` for them.
    fn take(&mut self, queue: NonNull<rd::rd_kafka_queue_t>, wait_ms: i32, room: usize) {
        let len = self.messages.len();
        let room = room.min(self.messages.capacity() - len);
        // SAFETY: the queue is alive, and `room` slots past `len` are within the vector's
        // capacity. librdkafka writes at most `room` message pointers there and returns how many,
        // or -1 on error (nothing written).
        let read = unsafe {
            rd::rd_kafka_consume_batch_queue(
                queue.as_ptr(),
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

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for message in self.messages.drain(..) {
            // SAFETY: each message came from `rd_kafka_consume_batch_queue` and is destroyed
            // once; the views `read` handed out did not outlive its loop.
            unsafe { rd::rd_kafka_message_destroy(message) };
        }
    }
}

/// One record (or consumer error) a [`FetchQueue::read`] hands over, for as long as `each` runs.
#[derive(Clone, Copy)]
pub struct Fetched<'b> {
    message: &'b rd::rd_kafka_message_t,
    /// The same message as librdkafka's pointer, whose provenance covers the `rd_kafka_msg_t` it
    /// is the first field of (a pointer from `message` covers the first field only).
    whole: *const rd::rd_kafka_message_t,
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
        // SAFETY: the message is valid (see `read`), and `kind` is a live out-parameter.
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
        if !self.may_have_headers() {
            return Vec::new();
        }
        self.parsed_headers()
    }

    /// False when the record's unparsed header section says it has no header: a count of 0.
    ///
    /// librdkafka's `rd_kafka_message_headers` parses that section on first access and, for a
    /// record without headers, still allocates, zeroes and frees a buffer of its own (about a
    /// kilobyte: `rd_kafka_buf_new_shadow`) just to read the count: 8 % of the process's CPU in
    /// the bench's Silver phase. So the source reads the count first, from the private
    /// `rd_kafka_msg_t` that every consumed message is the first field of ([`MsgPrefix`]), and
    /// only for the librdkafka version that layout was written against; any other version, or
    /// anything unexpected in the section, goes to librdkafka's parse as before.
    fn may_have_headers(&self) -> bool {
        if !*MSG_LAYOUT_KNOWN {
            return true;
        }
        let msg = self.whole.cast::<MsgPrefix>();
        // SAFETY: a message librdkafka hands out to a consumer is the first field of an
        // `rd_kafka_msg_t` (its `rd_kafka_message2msg` is this very cast), alive as long as the
        // message; `MsgPrefix` mirrors that struct's fields up to the unparsed headers, for
        // librdkafka 2.12.1 only (checked above). Three plain fields are read, nothing written.
        let (parsed, len, data) = unsafe {
            (
                std::ptr::addr_of!((*msg).headers).read(),
                std::ptr::addr_of!((*msg).binhdrs_len).read(),
                std::ptr::addr_of!((*msg).binhdrs_data).read(),
            )
        };
        if !parsed.is_null() {
            // Headers set after the fetch (an `on_consume` interceptor may): librdkafka's own.
            return true;
        }
        match len {
            // No header section at all (message format v0 and v1).
            0 => false,
            // SAFETY: one byte of the fetched buffer that the message keeps alive, at a pointer
            // librdkafka set together with the length.
            1 if !data.is_null() => unsafe { *data.cast::<u8>() != 0 },
            _ => true,
        }
    }

    /// The headers as librdkafka parses them.
    fn parsed_headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
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

/// The start of librdkafka's private `rd_kafka_msg_t` (`rdkafka_msg.h`, 2.12.1), up to a
/// consumed message's unparsed headers (`rkm_u.consumer.binhdrs`: a record's header count and
/// headers, as fetched). Read only where [`MSG_LAYOUT_KNOWN`].
#[repr(C)]
struct MsgPrefix {
    message: rd::rd_kafka_message_t,
    /// `TAILQ_ENTRY(rd_kafka_msg_s) rkm_link`.
    link: [*mut c_void; 2],
    flags: std::ffi::c_int,
    /// `rd_kafka_timestamp_type_t` (a C enum: an `int`).
    tstype: std::ffi::c_int,
    timestamp: i64,
    headers: *mut rd::rd_kafka_headers_t,
    /// `rd_kafka_msg_status_t` (a C enum: an `int`).
    status: std::ffi::c_int,
    broker_id: i32,
    /// The union `rkm_u` starts here (8-byte aligned, as `rd_kafkap_bytes_t` is): its consumer
    /// side's `rd_kafkap_bytes_t binhdrs` begins with `int32_t len; const void *data`.
    binhdrs_len: i32,
    binhdrs_data: *const c_void,
}

/// The librdkafka version [`MsgPrefix`] mirrors (`RD_KAFKA_VERSION` of 2.12.1).
const MSG_LAYOUT_VERSION: std::ffi::c_int = 0x020c_01ff;

/// Whether the librdkafka linked in is the one [`MsgPrefix`] mirrors, on a 64-bit target (the
/// offsets checked below: on 32-bit ones the union's alignment differs).
static MSG_LAYOUT_KNOWN: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    // SAFETY: `rd_kafka_version` only returns a constant.
    cfg!(target_pointer_width = "64") && unsafe { rd::rd_kafka_version() } == MSG_LAYOUT_VERSION
});

// The offsets of `rd_kafka_msg_t` in librdkafka 2.12.1 on a 64-bit target, from the C compiler:
// `rkm_headers` at 104, `rkm_u.consumer.binhdrs` at 120 (its `data` at 128).
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::offset_of!(MsgPrefix, headers) == 104);
    assert!(std::mem::offset_of!(MsgPrefix, binhdrs_len) == 120);
    assert!(std::mem::offset_of!(MsgPrefix, binhdrs_data) == 128);
};

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
pub(super) mod tests {
    use std::time::Instant;

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::Consumer;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    /// Sends records `from..to` to partition 0 of `topic`, each with its number as its value.
    pub(in crate::kafka) fn produce(producer: &BaseProducer, topic: &str, from: usize, to: usize) {
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

    pub(in crate::kafka) fn producer(brokers: &str) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("producer")
    }

    /// A consumer of `topic`'s partition 0, assigned from the beginning once `route` has routed
    /// it (to a fetch queue of the caller's).
    /// A consumer of `topic`'s partition 0 (as the source's: no end-of-partition messages).
    fn consumer(brokers: &str, topic: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", topic)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
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

    /// Reads until `want` records came (or 30 s passed): their offsets, checked against their
    /// values, and the largest number of messages one read handed over. Fails on an error.
    fn read_records(
        consumer: &BaseConsumer,
        fetch: &mut FetchQueue<'_>,
        topic: &str,
        want: usize,
    ) -> (Vec<i64>, usize) {
        let mut offsets = Vec::new();
        let mut largest = 0;
        let until = Instant::now() + Duration::from_secs(30);
        while offsets.len() < want && Instant::now() < until {
            assert!(
                !matches!(consumer.poll(Duration::ZERO), Some(Ok(_))),
                "a record reached the consumer queue"
            );
            let seen = fetch.read(Duration::from_millis(100), |message| {
                assert_eq!(message.error(), None, "at {}", message.offset());
                assert_eq!(message.topic(), topic.as_bytes());
                let value = message
                    .payload()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                assert_eq!(value, Some(message.offset().to_string()));
                offsets.push(message.offset());
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

    /// A fetch error reaches the reader as an error at the offset to fetch next, and the batch
    /// read moves the partition's position one past it: what `consumer::put_back` undoes. If a
    /// librdkafka upgrade stops moving it, this fails, and `put_back` is no longer needed.
    #[test]
    fn a_fetch_error_comes_at_the_next_offset_and_moves_the_position_past_it() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("faulty", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        produce(&producer(&brokers), "faulty", 0, 50);

        let consumer = consumer(&brokers, "faulty");
        let mut fetch = FetchQueue::new(&consumer).expect("queue");
        assert!(fetch.route("faulty", 0));
        assign_from_start(&consumer, "faulty");
        let (offsets, _) = read_records(&consumer, &mut fetch, "faulty", 50);
        assert_eq!(offsets, (0..50).collect::<Vec<_>>());
        assert_eq!(position(&consumer, "faulty"), Some(Offset::Offset(50)));

        // Two failing fetches: librdkafka reports the first that fails at the end of the partition
        // as reaching the end (silently here), not as the failure.
        cluster.request_errors(
            RDKafkaApiKey::Fetch,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG,
            ],
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
                error.get_or_insert((message.error(), message.offset()));
            });
        }
        assert_eq!(
            error,
            Some((Some(RDKafkaErrorCode::InvalidMessage), 50)),
            "the fetch error, at the offset to fetch next"
        );
        assert_eq!(
            position(&consumer, "faulty"),
            Some(Offset::Offset(51)),
            "librdkafka's batch read moves the position past the error"
        );
    }

    /// Records without headers skip librdkafka's parse (`may_have_headers`, which reads its
    /// private message layout), and every record's headers come out as librdkafka parses them:
    /// none, one, or several with a null value, in plain and in compressed batches. A
    /// librdkafka whose layout differs from `MsgPrefix` fails this (or is not 2.12.1, and then
    /// `may_have_headers` is never false).
    #[test]
    fn records_without_headers_skip_the_parse_and_headers_come_out_whole() {
        use rdkafka::message::{Header, OwnedHeaders};

        assert!(
            *MSG_LAYOUT_KNOWN,
            "not the librdkafka version MsgPrefix mirrors"
        );
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("headers", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let expected = |i: usize| -> Vec<(String, Option<Vec<u8>>)> {
            match i % 3 {
                0 => Vec::new(),
                1 => vec![("trace".to_string(), Some(i.to_string().into_bytes()))],
                _ => vec![
                    ("a".to_string(), Some(Vec::new())),
                    ("nothing".to_string(), None),
                ],
            }
        };
        let records = 300;
        for (from, compression) in [(0, "none"), (records / 2, "zstd")] {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("compression.type", compression)
                .create()
                .expect("producer");
            for i in from..from + records / 2 {
                let value = i.to_string();
                let mut record = BaseRecord::<'_, [u8], [u8]>::to("headers")
                    .partition(0)
                    .payload(value.as_bytes());
                if i % 3 != 0 {
                    let mut headers = OwnedHeaders::new();
                    for (key, value) in expected(i) {
                        headers = headers.insert(Header {
                            key: &key,
                            value: value.as_deref(),
                        });
                    }
                    record = record.headers(headers);
                }
                producer.send(record).map_err(|(e, _)| e).expect("send");
                producer.poll(Duration::ZERO);
            }
            producer.flush(Duration::from_secs(10)).expect("flush");
        }

        let consumer = consumer(&brokers, "headers");
        let mut fetch = FetchQueue::new(&consumer).expect("queue");
        assert!(fetch.route("headers", 0));
        assign_from_start(&consumer, "headers");
        let mut seen = 0;
        let until = Instant::now() + Duration::from_secs(30);
        while seen < records && Instant::now() < until {
            let _ = consumer.poll(Duration::ZERO);
            fetch.read(Duration::from_millis(100), |message| {
                assert_eq!(message.error(), None);
                let i = usize::try_from(message.offset()).expect("offset");
                assert_eq!(message.may_have_headers(), i % 3 != 0, "record {i}");
                assert_eq!(message.headers(), expected(i), "record {i}");
                assert_eq!(message.parsed_headers(), expected(i), "record {i}");
                seen += 1;
            });
        }
        assert_eq!(seen, records);
    }

    /// A wake from another thread ends a long wait for records at once, and a wake that comes
    /// while no one waits ends the next wait: the source sleeps long only because it is woken.
    #[test]
    fn a_wake_ends_the_wait_for_records_and_none_is_lost() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("quiet", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let consumer = consumer(&brokers, "quiet");
        let mut fetch = FetchQueue::new(&consumer).expect("queue");
        let wake = Wake::default();
        fetch.wake_by(&wake);
        assert!(fetch.route("quiet", 0));
        assign_from_start(&consumer, "quiet");
        // A read that waits up to 30 s for records that never come: it must end long before.
        let long = std::time::Duration::from_secs(30);
        let read_ends_early = |fetch: &mut FetchQueue<'_>| {
            let started = Instant::now();
            assert_eq!(fetch.read(long, |_| {}), 0);
            let waited = started.elapsed();
            assert!(waited < long / 2, "woken after {waited:?}");
        };

        let waker = {
            let wake = wake.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                wake.wake();
            })
        };
        read_ends_early(&mut fetch);
        waker.join().expect("waker");

        wake.wake();
        read_ends_early(&mut fetch);

        // Once the queue is gone, waking does nothing (and touches no freed queue).
        drop(fetch);
        wake.wake();
    }
}
