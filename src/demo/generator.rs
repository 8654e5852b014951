//! Test and benchmark fixtures, also used by the demo: the order schemas, a generator of skewed
//! order events in two writer versions with some undecodable records, and producing them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use apache_avro::types::Value;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::schema::wire;

/// Order events as producers first wrote them.
pub const ORDER_V1: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

/// Version 2 adds an optional coupon and a quantity with a default.
pub const ORDER_V2: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"coupon","type":["null","string"],"default":null},
  {"name":"quantity","type":"int","default":1}]}"#;

/// The reader schema of the demo's table (`schemas/order.avsc`).
pub const ORDER_READER: &str = include_str!("../../schemas/order.avsc");

/// `n` generated order records of partition 0 of `orders`, as the source hands them over (for
/// tests and benches).
pub fn generated_records(
    n: usize,
    seed: u64,
    bad_every: u64,
) -> anyhow::Result<Vec<crate::models::SourceRecord>> {
    let mut generator = OrderGenerator::new(seed, bad_every)?;
    (0..n)
        .map(|i| {
            Ok(crate::models::SourceRecord {
                topic: "orders".into(),
                partition: 0,
                offset: i as i64,
                timestamp_ms: Some(1_700_000_000_000),
                key: None,
                value: Some(generator.next_record()?.value.into()),
                headers: Vec::new(),
            })
        })
        .collect()
}

/// A decoder for the demo's table that knows both writer versions (ids 1 and 2).
pub fn order_decoder(batch_size: usize) -> anyhow::Result<crate::silver::decode::BatchDecoder> {
    let mut decoder =
        crate::silver::decode::BatchDecoder::new(ORDER_READER, "event_time", batch_size)?;
    decoder.register(1, Ok(ORDER_V1));
    decoder.register(2, Ok(ORDER_V2));
    Ok(decoder)
}

const PRODUCTS: [&str; 8] = [
    "keyboard", "mouse", "monitor", "laptop", "cable", "dock", "headset", "webcam",
];

/// A generator of order events: Zipf-like customer skew, two writer schema versions, event times
/// spread over the last few hours, and about one in `bad_every` records undecodable.
pub struct OrderGenerator {
    rng: rand::rngs::StdRng,
    v1: apache_avro::Schema,
    v2: apache_avro::Schema,
    now_ms: i64,
    bad_every: u64,
    produced: u64,
    /// `Some((step, jitter))`: event times advance `step` ms per record from three hours ago, each
    /// up to `jitter` ms early (a stream for event-time windows); `None`: random over three hours.
    ordered: Option<(i64, i64)>,
}

/// One generated Kafka record.
pub struct Generated {
    pub key: String,
    pub value: Vec<u8>,
    /// Whether Strata should accept it (false: it must reach the dead-letter topic).
    pub decodable: bool,
}

impl OrderGenerator {
    pub fn new(seed: u64, bad_every: u64) -> anyhow::Result<Self> {
        Ok(Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            v1: apache_avro::Schema::parse_str(ORDER_V1)?,
            v2: apache_avro::Schema::parse_str(ORDER_V2)?,
            now_ms: chrono::Utc::now().timestamp_millis(),
            bad_every: bad_every.max(1),
            produced: 0,
            ordered: None,
        })
    }

    /// Event times that advance `step_ms` per record, each up to `jitter_ms` out of order.
    pub fn ordered(mut self, step_ms: i64, jitter_ms: i64) -> Self {
        self.ordered = Some((step_ms, jitter_ms.max(1)));
        self
    }

    /// Customer rank with a heavy head: rank 1 takes a large share of all orders.
    fn customer(&mut self) -> u32 {
        let u: f64 = self.rng.random_range(0.0001..1.0);
        ((1.0 / u).powf(1.2) as u32).clamp(1, 10_000)
    }

    pub fn next_record(&mut self) -> anyhow::Result<Generated> {
        let n = self.produced;
        self.produced += 1;
        let customer = format!("c{}", self.customer());
        if self.bad_every > 1 && n % self.bad_every == self.bad_every - 1 {
            let value = match (n / self.bad_every) % 3 {
                0 => br#"{"order_id": 1, "note": "JSON on an Avro topic"}"#.to_vec(),
                1 => wire::frame(999, &[2, 4, 6]), // unknown schema id
                _ => wire::frame(1, &[0x80]),      // truncated varint
            };
            return Ok(Generated {
                key: customer,
                value,
                decodable: false,
            });
        }
        let event_time = match self.ordered {
            Some((step, jitter)) => {
                self.now_ms - 3 * 3_600_000 + n as i64 * step - self.rng.random_range(0..jitter)
            }
            None => self.now_ms - self.rng.random_range(0..3 * 3_600_000),
        };
        let product = PRODUCTS[self.rng.random_range(0..PRODUCTS.len())];
        let amount = (self.rng.random_range(100..100_000) as f64) / 100.0;
        let mut fields = vec![
            ("order_id".to_string(), Value::Long(n as i64)),
            ("customer_id".to_string(), Value::String(customer.clone())),
            ("product".to_string(), Value::String(product.to_string())),
            ("amount".to_string(), Value::Double(amount)),
            ("event_time".to_string(), Value::TimestampMillis(event_time)),
        ];
        let value = if n % 2 == 0 {
            wire::frame(1, &avro_body(&self.v1, Value::Record(fields))?)
        } else {
            let coupon = if n % 5 == 0 {
                Value::Union(1, Box::new(Value::String("WELCOME10".into())))
            } else {
                Value::Union(0, Box::new(Value::Null))
            };
            fields.push(("coupon".to_string(), coupon));
            fields.push((
                "quantity".to_string(),
                Value::Int(self.rng.random_range(1..5)),
            ));
            wire::frame(2, &avro_body(&self.v2, Value::Record(fields))?)
        };
        Ok(Generated {
            key: customer,
            value,
            decodable: true,
        })
    }
}

/// The Avro binary encoding of `value` (no framing).
pub fn avro_body(
    schema: &apache_avro::Schema,
    value: Value,
) -> Result<Vec<u8>, apache_avro::Error> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(value)
}

/// One record produced by [`produce_orders`], with where it landed.
pub struct ProducedRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub value: Vec<u8>,
    /// Whether Strata should accept it (false: it belongs in the dead-letter topic).
    pub decodable: bool,
}

impl ProducedRecord {
    pub fn position(&self) -> (String, i32, i64) {
        (self.topic.clone(), self.partition, self.offset)
    }
}

/// What a producer run left in Kafka.
#[derive(Default)]
pub struct ProducedOrders {
    pub records: Vec<ProducedRecord>,
}

impl ProducedOrders {
    pub fn good(&self) -> impl Iterator<Item = &ProducedRecord> {
        self.records.iter().filter(|r| r.decodable)
    }

    pub fn bad(&self) -> impl Iterator<Item = &ProducedRecord> {
        self.records.iter().filter(|r| !r.decodable)
    }

    /// Last offset per partition: where the table's progress ends once everything is handled.
    pub fn last_offsets(&self) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            let slot = out.entry(r.partition).or_insert(-1);
            *slot = (*slot).max(r.offset);
        }
        out
    }
}

/// Produces `count` generated orders (one in `bad_every` undecodable) to `topic` and records where
/// each landed.
pub async fn produce_orders(
    brokers: &str,
    topic: &str,
    count: u64,
    bad_every: u64,
    seed: u64,
) -> anyhow::Result<ProducedOrders> {
    produce_generated(brokers, topic, count, OrderGenerator::new(seed, bad_every)?).await
}

/// Produces `count` records of `generator` to `topic` and records where each landed.
pub async fn produce_generated(
    brokers: &str,
    topic: &str,
    count: u64,
    generator: OrderGenerator,
) -> anyhow::Result<ProducedOrders> {
    produce_generated_with(brokers, &[], topic, count, generator).await
}

/// [`produce_generated`] with more librdkafka properties (security, `compression.type`, …).
pub async fn produce_generated_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    count: u64,
    mut generator: OrderGenerator,
) -> anyhow::Result<ProducedOrders> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000");
    for (key, value) in properties {
        config.set(key, value);
    }
    let producer: FutureProducer = config.create()?;
    let mut produced = ProducedOrders::default();
    let mut remaining = count;
    while remaining > 0 {
        let n = remaining.min(20_000);
        remaining -= n;
        let batch: Vec<Generated> = (0..n)
            .map(|_| generator.next_record())
            .collect::<anyhow::Result<_>>()?;
        let sends = batch.iter().map(|r| {
            producer.send(
                FutureRecord::to(topic).key(&r.key).payload(&r.value),
                Duration::from_secs(60),
            )
        });
        let delivered = futures::future::join_all(sends).await;
        for (record, result) in batch.into_iter().zip(delivered) {
            let delivery = result.map_err(|(e, _)| e).context("producing an order")?;
            produced.records.push(ProducedRecord {
                topic: topic.to_string(),
                partition: delivery.partition,
                offset: delivery.offset,
                value: record.value,
                decodable: record.decodable,
            });
        }
    }
    Ok(produced)
}
