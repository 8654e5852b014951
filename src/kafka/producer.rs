//! The producer of what Strata writes to Kafka (dead letters, Gold partials): librdkafka's
//! producer, with a thread of its own serving delivery reports.
//!
//! rust-rdkafka's `FutureProducer` does the same through its `ThreadedProducer`, whose thread
//! polls with a 100 ms deadline; in the last millisecond of each the timeout rounds down to zero
//! and the loop spins until the deadline (`BaseProducer::poll`). That is about 1 % of a core per
//! producer, idle or busy, and a replica with Gold runs three. This thread polls with a [`POLL`]
//! deadline plus [`POLL_SLACK`]: in a poll that serves no event, librdkafka's wait, given the
//! whole milliseconds, then ends just after the deadline instead of up to a millisecond before it,
//! so the spin lasts at most the slack (an idle producer spins no more). After an event is served
//! the remaining time rounds down again, so a busy producer still spins up to a millisecond per
//! poll (0.4 %). A delivery report is served as soon as it is ready either way (each wait inside
//! the poll ends on an event); dropping the producer waits for the thread to end its poll, up to
//! [`POLL`], so that librdkafka is destroyed before the process exits.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage, Timestamp};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureRecord, Producer as _, ProducerContext,
};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

/// How long one poll of the delivery thread lasts.
const POLL: Duration = Duration::from_millis(250);

/// Added to [`POLL`]: more than the few microseconds between the poll's start and its wait, less
/// than a wake-up takes, so the wait (whole milliseconds) ends after the deadline.
const POLL_SLACK: Duration = Duration::from_micros(20);

/// Where a message landed (partition, offset), or why it did not, with the message.
pub type Delivered = Result<(i32, i64), (KafkaError, OwnedMessage)>;

/// A record librdkafka refused to queue, with the reason.
pub type Refused<'a> = (KafkaError, FutureRecord<'a, [u8], [u8]>);

/// Hands each delivery report to the future that waits for it.
pub struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        let delivered = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((e, message)) => Err((e.clone(), message.detach())),
        };
        // The sender gave up waiting (shutdown): nobody to tell.
        let _ = waiting.send(delivered);
    }
}

/// A producer and its delivery thread; clones share both. The last clone stops the thread and
/// waits for it (up to [`POLL`]); the producer is then dropped, which purges what is still queued.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Polled>,
}

struct Polled {
    producer: Arc<BaseProducer<Deliveries>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Producer {
    /// Creates the producer from `config` and starts its delivery thread.
    pub fn create(config: &ClientConfig) -> KafkaResult<Self> {
        let producer: Arc<BaseProducer<Deliveries>> =
            Arc::new(config.create_with_context(Deliveries)?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (producer, stop) = (producer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("strata-producer".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        producer.poll(POLL + POLL_SLACK);
                    }
                })
                .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
        };
        Ok(Self {
            shared: Arc::new(Polled {
                producer,
                stop,
                thread: Some(thread),
            }),
        })
    }

    /// The librdkafka client (metadata, watermarks).
    pub fn client(&self) -> &Client<Deliveries> {
        self.shared.producer.client()
    }

    /// Queues `record` and returns the future of its delivery report, or the error and the record
    /// when librdkafka refuses it now (a full queue, for one).
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a>(
        &self,
        record: FutureRecord<'a, [u8], [u8]>,
    ) -> Result<impl Future<Output = Delivered> + use<>, Refused<'a>> {
        let (sender, receiver) = oneshot::channel();
        match self
            .shared
            .producer
            .send(base_record(record, Box::new(sender)))
        {
            Ok(()) => Ok(async move {
                receiver
                    .await
                    .unwrap_or_else(|_| Err((KafkaError::Canceled, canceled_message())))
            }),
            Err((e, refused)) => Err((e, future_record(refused))),
        }
    }

    /// Sends `record`, waiting up to `queue_timeout` for room in a full queue, and returns its
    /// delivery report.
    pub async fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
        queue_timeout: Duration,
    ) -> Delivered {
        let started = Instant::now();
        loop {
            match self.send_result(record) {
                Ok(delivery) => return delivery.await,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), refused))
                    if started.elapsed() < queue_timeout =>
                {
                    record = refused;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((e, refused)) => return Err((e, owned(refused))),
            }
        }
    }
}

fn base_record<'a, D: rdkafka::util::IntoOpaque>(
    record: FutureRecord<'a, [u8], [u8]>,
    opaque: D,
) -> BaseRecord<'a, [u8], [u8], D> {
    BaseRecord {
        topic: record.topic,
        partition: record.partition,
        payload: record.payload,
        key: record.key,
        timestamp: record.timestamp,
        headers: record.headers,
        delivery_opaque: opaque,
    }
}

fn future_record<'a, D: rdkafka::util::IntoOpaque>(
    record: BaseRecord<'a, [u8], [u8], D>,
) -> FutureRecord<'a, [u8], [u8]> {
    FutureRecord {
        topic: record.topic,
        partition: record.partition,
        payload: record.payload,
        key: record.key,
        timestamp: record.timestamp,
        headers: record.headers,
    }
}

/// A refused record as an owned message, for the error.
fn owned(record: FutureRecord<'_, [u8], [u8]>) -> OwnedMessage {
    OwnedMessage::new(
        record.payload.map(<[u8]>::to_vec),
        record.key.map(<[u8]>::to_vec),
        record.topic.to_owned(),
        record
            .timestamp
            .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
        record.partition.unwrap_or(-1),
        0,
        record.headers,
    )
}

/// The message of a delivery whose report never came (the producer went away first).
fn canceled_message() -> OwnedMessage {
    OwnedMessage::new(
        None,
        None,
        String::new(),
        Timestamp::NotAvailable,
        -1,
        0,
        None,
    )
}
