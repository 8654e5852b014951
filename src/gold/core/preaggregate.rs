//! Stage 1 of Gold: local pre-aggregation. Decoded rows of one source partition are assigned to
//! their event-time windows and folded into one accumulator per (window, key), so what leaves a
//! replica is bounded by the number of (window, key) pairs, not by the event rate. A Space-Saving
//! sketch over the same rows names the hot keys of the epoch.

use std::collections::HashMap;

use rustc_hash::FxHashMap;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float32Array, Float64Array, Int32Array, Int64Array,
    RecordBatch, StringArray,
};
use deltalake::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int32Type, Int64Type, Schema, TimestampMicrosecondType,
};

use super::aggregate::{Accumulator, Aggregate, Function, Input};
use super::heavy::SpaceSaving;
use super::hll::{fmix64, hash64};
use super::partial::KeyValue;
use super::window::WindowSpec;

/// What Gold computes.
#[derive(Debug, Clone)]
pub struct GoldSpec {
    pub key_fields: Vec<String>,
    pub window: WindowSpec,
    pub aggregates: Vec<Aggregate>,
    pub event_time_field: String,
}

/// A Gold spec that does not fit the Silver table: it names the setting and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("field {0} is not in the table")]
    NoField(String),
    #[error("STRATA_GOLD_KEY field {field} has type {found}, expected a string or an integer")]
    Key { field: String, found: String },
    #[error("{aggregate} needs a number, field {field} has type {found}")]
    NotNumeric {
        aggregate: String,
        field: String,
        found: String,
    },
    #[error("{aggregate}: field {field} has type {found}, expected a string, bytes or a number")]
    NotDistinctable {
        aggregate: String,
        field: String,
        found: String,
    },
    #[error("event time field {field} has type {found}")]
    EventTime { field: String, found: String },
}

/// Rows that do not have the shape the spec was checked against (a bug, not bad input: the
/// decoder produced them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowsError {
    #[error("column {0} missing")]
    Missing(String),
    #[error("event time is not a microsecond timestamp")]
    EventTime,
    #[error("arrow: {0}")]
    Arrow(String),
}

impl GoldSpec {
    /// Checks the spec against the Silver rows' schema: key fields must be strings or integers,
    /// numeric aggregates need numbers, event time a timestamp. Errors name the field.
    pub fn check(&self, schema: &Schema) -> Result<(), SpecError> {
        let field = |name: &str| {
            schema
                .field_with_name(name)
                .map_err(|_| SpecError::NoField(name.to_string()))
        };
        for key in &self.key_fields {
            let f = field(key)?;
            if !matches!(
                f.data_type(),
                DataType::Utf8 | DataType::Int32 | DataType::Int64
            ) {
                return Err(SpecError::Key {
                    field: key.clone(),
                    found: f.data_type().to_string(),
                });
            }
        }
        for aggregate in &self.aggregates {
            let Some(name) = &aggregate.field else {
                continue;
            };
            let f = field(name)?;
            let numeric = matches!(
                f.data_type(),
                DataType::Int32 | DataType::Int64 | DataType::Float32 | DataType::Float64
            );
            if aggregate.numeric() && !numeric {
                return Err(SpecError::NotNumeric {
                    aggregate: aggregate.to_string(),
                    field: name.clone(),
                    found: f.data_type().to_string(),
                });
            }
            if aggregate.function == Function::ApproxDistinct
                && !numeric
                && !matches!(f.data_type(), DataType::Utf8 | DataType::Binary)
            {
                return Err(SpecError::NotDistinctable {
                    aggregate: aggregate.to_string(),
                    field: name.clone(),
                    found: f.data_type().to_string(),
                });
            }
        }
        match field(&self.event_time_field)?.data_type() {
            DataType::Timestamp(_, _) => Ok(()),
            other => Err(SpecError::EventTime {
                field: self.event_time_field.clone(),
                found: other.to_string(),
            }),
        }
    }
}

/// A column of a batch viewed as its Arrow type once per batch, so that reading a row does not ask
/// the array its type again.
#[derive(Debug, Clone, Copy)]
enum Typed<'a> {
    Utf8(&'a StringArray),
    Binary(&'a BinaryArray),
    Int32(&'a Int32Array),
    Int64(&'a Int64Array),
    Float32(&'a Float32Array),
    Float64(&'a Float64Array),
    /// A type no key or aggregate reads: its rows read as nulls.
    Other,
}

impl<'a> Typed<'a> {
    fn of(column: &'a ArrayRef) -> Self {
        match column.data_type() {
            DataType::Utf8 => column.as_string_opt::<i32>().map(Typed::Utf8),
            DataType::Binary => column.as_binary_opt::<i32>().map(Typed::Binary),
            DataType::Int32 => column.as_primitive_opt::<Int32Type>().map(Typed::Int32),
            DataType::Int64 => column.as_primitive_opt::<Int64Type>().map(Typed::Int64),
            DataType::Float32 => column.as_primitive_opt::<Float32Type>().map(Typed::Float32),
            DataType::Float64 => column.as_primitive_opt::<Float64Type>().map(Typed::Float64),
            _ => None,
        }
        .unwrap_or(Typed::Other)
    }

    /// The row's value as a key: strings and integers; any other type, or a null, is the null key.
    fn key(self, row: usize) -> KeyRef<'a> {
        match self {
            Typed::Utf8(a) if a.is_valid(row) => KeyRef::Str(a.value(row)),
            Typed::Int32(a) if a.is_valid(row) => KeyRef::Int(i64::from(a.value(row))),
            Typed::Int64(a) if a.is_valid(row) => KeyRef::Int(a.value(row)),
            _ => KeyRef::Null,
        }
    }

    /// The row's value as an aggregate's input.
    fn input(self, row: usize) -> Input<'a> {
        match self {
            Typed::Utf8(a) if a.is_valid(row) => Input::Bytes(a.value(row).as_bytes()),
            Typed::Binary(a) if a.is_valid(row) => Input::Bytes(a.value(row)),
            Typed::Int32(a) if a.is_valid(row) => Input::Int(i64::from(a.value(row))),
            Typed::Int64(a) if a.is_valid(row) => Input::Int(a.value(row)),
            Typed::Float32(a) if a.is_valid(row) => Input::Number(f64::from(a.value(row))),
            Typed::Float64(a) if a.is_valid(row) => Input::Number(a.value(row)),
            _ => Input::Null,
        }
    }
}

/// A key value as a row holds it, borrowed from its column: looking a key up allocates nothing;
/// only a key met for the first time is copied.
#[derive(Debug, Clone, Copy)]
enum KeyRef<'a> {
    Null,
    Int(i64),
    Str(&'a str),
}

impl<'a> KeyRef<'a> {
    fn of(value: &'a KeyValue) -> Self {
        match value {
            KeyValue::Null => KeyRef::Null,
            KeyValue::Int(v) => KeyRef::Int(*v),
            KeyValue::Str(s) => KeyRef::Str(s),
        }
    }

    /// Equal values (of whatever lifetimes).
    fn same(self, other: KeyRef<'_>) -> bool {
        match (self, other) {
            (KeyRef::Null, KeyRef::Null) => true,
            (KeyRef::Int(a), KeyRef::Int(b)) => a == b,
            (KeyRef::Str(a), KeyRef::Str(b)) => a == b,
            _ => false,
        }
    }

    fn owned(self) -> KeyValue {
        match self {
            KeyRef::Null => KeyValue::Null,
            KeyRef::Int(v) => KeyValue::Int(v),
            KeyRef::Str(s) => KeyValue::Str(s.to_string()),
        }
    }

    fn hash(self, h: u64) -> u64 {
        let value = match self {
            KeyRef::Null => 0x9e37_79b9_7f4a_7c15,
            KeyRef::Int(v) => fmix64(v as u64 ^ 0x5851_f42d_4c95_7f2d),
            KeyRef::Str(s) => hash64(s.as_bytes()),
        };
        fmix64(h.rotate_left(5) ^ value)
    }
}

/// Dense ids for the keys of an epoch, by a 64-bit hash of the borrowed values (a second table
/// holds the rare keys whose hash another key already has).
#[derive(Debug, Default)]
struct KeyIds {
    by_hash: HashMap<u64, u32, BuildNoHash>,
    collided: Vec<(u64, u32)>,
    list: Vec<Vec<KeyValue>>,
}

impl KeyIds {
    fn id<'a>(&mut self, values: impl Iterator<Item = KeyRef<'a>> + Clone) -> u32 {
        let hash = values.clone().fold(0, |h, v| v.hash(h));
        let same = |list: &[Vec<KeyValue>], id: u32| {
            list.get(id as usize).is_some_and(|key| {
                key.len() == values.clone().count()
                    && key
                        .iter()
                        .zip(values.clone())
                        .all(|(k, v)| KeyRef::of(k).same(v))
            })
        };
        match self.by_hash.get(&hash) {
            Some(id) if same(&self.list, *id) => return *id,
            Some(_) => {
                if let Some((_, id)) = self
                    .collided
                    .iter()
                    .find(|(h, id)| *h == hash && same(&self.list, *id))
                {
                    return *id;
                }
            }
            None => {}
        }
        let id = self.list.len() as u32;
        self.list.push(values.map(KeyRef::owned).collect());
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => self.collided.push((hash, id)),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(id);
            }
        }
        id
    }

    fn of_row(&mut self, columns: &[Typed<'_>], row: usize) -> u32 {
        self.id(columns.iter().map(|c| c.key(row)))
    }

    #[cfg(test)]
    fn of_key(&mut self, key: &[KeyValue]) -> u32 {
        self.id(key.iter().map(KeyRef::of))
    }
}

/// The keys are hashes already: a hasher that passes them through (no SipHash on the hot path).
#[derive(Debug, Default, Clone, Copy)]
struct BuildNoHash;

impl std::hash::BuildHasher for BuildNoHash {
    type Hasher = NoHash;
    fn build_hasher(&self) -> NoHash {
        NoHash(0)
    }
}

struct NoHash(u64);

impl std::hash::Hasher for NoHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The pre-aggregated state of one source partition's epoch.
#[derive(Debug)]
pub struct PreAggregator {
    keys: KeyIds,
    groups: FxHashMap<(i64, u32, u16), Accumulator>,
    /// Hot keys (by id) and the turn of their next event: events of a hot key take the salts
    /// 1..=`salts` in turn, so its load spreads evenly over `salts` sub-keys.
    salted: FxHashMap<u32, u64>,
    salts: u16,
    events: u64,
}

impl Default for PreAggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl PreAggregator {
    pub fn new() -> Self {
        Self {
            keys: KeyIds::default(),
            groups: FxHashMap::default(),
            salted: FxHashMap::default(),
            salts: 1,
            events: 0,
        }
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// Salts the keys of ids `hot` (see [`PreAggregator::hot_ids`]): their events take the salts
    /// 1..=`salts` in turn, the first one `start` (fixed by source partition and epoch, so a replay
    /// salts identically). Call before folding.
    pub fn salt_ids(&mut self, hot: &[u32], salts: u16, start: u64) {
        if salts < 2 {
            return;
        }
        self.salts = salts;
        for id in hot {
            self.salted.insert(*id, start);
        }
    }

    /// Hot keys of `batches` without folding them: keys holding at least `share` of the rows (and
    /// at least `min_events`), by a Space-Saving sketch of `capacity` keys.
    pub fn scan_hot(
        spec: &GoldSpec,
        batches: &[RecordBatch],
        capacity: usize,
        share: f64,
        min_events: u64,
    ) -> Result<Vec<Vec<KeyValue>>, RowsError> {
        let mut pre = PreAggregator::new();
        let (hot, _) = pre.hot_ids(spec, batches, capacity, share, min_events)?;
        Ok(hot
            .into_iter()
            .filter_map(|id| pre.keys.list.get(id as usize).cloned())
            .collect())
    }

    /// [`PreAggregator::scan_hot`] as ids of this aggregator's keys, with the key id of every row
    /// of `batches` (batch by batch) for [`PreAggregator::fold`], so that folding does not look
    /// each key up again. Call on a new aggregator: ids are then given in row order, as the sketch
    /// has always seen them, and a replay by any version finds the same hot keys.
    pub fn hot_ids(
        &mut self,
        spec: &GoldSpec,
        batches: &[RecordBatch],
        capacity: usize,
        share: f64,
        min_events: u64,
    ) -> Result<(Vec<u32>, Vec<Vec<u32>>), RowsError> {
        debug_assert!(
            self.keys.list.is_empty(),
            "hot_ids on a new aggregator only"
        );
        let mut heavy = SpaceSaving::new(capacity);
        let mut rows = Vec::with_capacity(batches.len());
        for batch in batches {
            let keys = key_columns(spec, batch)?;
            let ids: Vec<u32> = (0..batch.num_rows())
                .map(|row| self.keys.of_row(&keys, row))
                .collect();
            for id in &ids {
                heavy.add(&id.to_le_bytes(), 1);
            }
            rows.push(ids);
        }
        let hot = heavy
            .hot(share)
            .into_iter()
            .filter(|(_, count)| *count >= min_events)
            .filter_map(|(id, _)| Some(u32::from_le_bytes(id.try_into().ok()?)))
            .collect();
        Ok((hot, rows))
    }

    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Folds the rows of `batch` (Silver rows). `keep(row, event time, window start)` says whether
    /// the row counts in that window (a window it is late for is set apart by the caller); a row
    /// kept in no window, or without event time, is not folded. Returns the rows folded.
    pub fn add_batch(
        &mut self,
        spec: &GoldSpec,
        batch: &RecordBatch,
        keep: impl FnMut(usize, i64, i64) -> bool,
    ) -> Result<usize, RowsError> {
        self.fold(spec, batch, None, keep)
    }

    /// [`PreAggregator::add_batch`], with the key id of each row when [`PreAggregator::hot_ids`]
    /// gave them (`ids`, one per row of `batch`).
    pub fn fold(
        &mut self,
        spec: &GoldSpec,
        batch: &RecordBatch,
        ids: Option<&[u32]>,
        mut keep: impl FnMut(usize, i64, i64) -> bool,
    ) -> Result<usize, RowsError> {
        let column = |name: &str| -> Result<&ArrayRef, RowsError> {
            batch
                .column_by_name(name)
                .ok_or_else(|| RowsError::Missing(name.to_string()))
        };
        let times = column(&spec.event_time_field)?
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or(RowsError::EventTime)?;
        let keys = key_columns(spec, batch)?;
        let inputs: Vec<Option<Typed<'_>>> = spec
            .aggregates
            .iter()
            .map(|a| a.field.as_deref().map(column).transpose())
            .map(|c| c.map(|c| c.map(Typed::of)))
            .collect::<Result<_, _>>()?;
        let ids = ids.filter(|ids| ids.len() == batch.num_rows());
        let mut folded = 0;
        let mut row_inputs: Vec<Input<'_>> = Vec::with_capacity(inputs.len());
        let mut starts: Vec<i64> = Vec::new();
        for row in 0..batch.num_rows() {
            if times.is_null(row) {
                continue;
            }
            let t = times.value(row);
            starts.clear();
            starts.extend(spec.window.starts(t).filter(|start| keep(row, t, *start)));
            if starts.is_empty() {
                continue;
            }
            let id = match ids {
                Some(ids) => ids[row],
                None => self.keys.of_row(&keys, row),
            };
            let salt = match self.salted.get_mut(&id) {
                Some(turn) => {
                    let salt = 1 + (*turn % u64::from(self.salts)) as u16;
                    *turn += 1;
                    salt
                }
                None => 0,
            };
            row_inputs.clear();
            row_inputs.extend(
                inputs
                    .iter()
                    .map(|input| input.map_or(Input::Null, |c| c.input(row))),
            );
            for start in &starts {
                self.groups
                    .entry((*start, id, salt))
                    .or_insert_with(|| Accumulator::new(&spec.aggregates))
                    .add(&row_inputs);
            }
            self.events += 1;
            folded += 1;
        }
        Ok(folded)
    }

    /// The (window start, key, salt, accumulator) groups, in a deterministic order (window, key,
    /// salt), so a replay of the same rows emits the same partials in the same order.
    pub fn into_groups(self) -> Vec<(i64, Vec<KeyValue>, u16, Accumulator)> {
        let mut out: Vec<(i64, Vec<KeyValue>, u16, Accumulator)> = self
            .groups
            .into_iter()
            .map(|((start, id, salt), acc)| {
                let key = self.keys.list.get(id as usize).cloned().unwrap_or_default();
                (start, key, salt, acc)
            })
            .collect();
        out.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.cmp(&b.1))
                .then_with(|| a.2.cmp(&b.2))
        });
        out
    }
}

/// The key columns of `batch`, in the spec's order.
fn key_columns<'a>(spec: &GoldSpec, batch: &'a RecordBatch) -> Result<Vec<Typed<'a>>, RowsError> {
    spec.key_fields
        .iter()
        .map(|k| {
            batch
                .column_by_name(k)
                .map(Typed::of)
                .ok_or_else(|| RowsError::Missing(k.clone()))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn key_ids_agree_between_rows_and_owned_keys_and_collisions_stay_apart() {
        use deltalake::arrow::array::{Int64Array, StringArray};
        let names: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a"),
            Some("b"),
            None,
            Some("a"),
        ]));
        let numbers: ArrayRef = Arc::new(Int64Array::from(vec![1, 1, 1, 1]));
        let columns = [Typed::of(&names), Typed::of(&numbers)];
        let mut ids = KeyIds::default();
        let row_ids: Vec<u32> = (0..4).map(|row| ids.of_row(&columns, row)).collect();
        assert_eq!(row_ids, [0, 1, 2, 0]);
        assert_eq!(
            ids.of_key(&[KeyValue::Str("b".into()), KeyValue::Int(1)]),
            1
        );
        assert_eq!(ids.of_key(&[KeyValue::Null, KeyValue::Int(1)]), 2);
        // Two keys forced under one hash are still told apart.
        let mut forced = KeyIds::default();
        let first = forced.of_key(&[KeyValue::Int(7)]);
        let hash = [KeyRef::Int(7)].into_iter().fold(0, |h, v| v.hash(h));
        forced.by_hash.insert(hash, first);
        forced.list.push(vec![KeyValue::Int(8)]);
        forced.by_hash.insert(hash, 1);
        assert_eq!(
            forced.of_key(&[KeyValue::Int(7)]),
            2,
            "a key under another's hash gets its own id"
        );
        assert_eq!(forced.of_key(&[KeyValue::Int(7)]), 2, "and finds it again");
        assert_eq!(forced.collided.len(), 1);
    }
    use crate::gold::core::aggregate::{parse_aggregates, Output};
    use deltalake::arrow::array::{Float64Array, StringArray, TimestampMicrosecondArray};
    use deltalake::arrow::datatypes::{Field, TimeUnit};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn spec(window: &str) -> GoldSpec {
        GoldSpec {
            key_fields: vec!["customer".into()],
            window: window.parse().expect("window"),
            aggregates: parse_aggregates(
                "count, sum(amount), min(amount), max(amount), avg(amount)",
            )
            .expect("aggregates"),
            event_time_field: "event_time".into(),
        }
    }

    /// Silver-like rows (customer, amount, event time) for the Gold tests.
    pub(crate) fn orders_batch(rows: &[(String, f64, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("customer", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, true),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.0.clone()),
                )),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.2))
                        .with_timezone("UTC"),
                ),
            ],
        )
        .expect("batch")
    }

    fn batch(rows: &[(u8, f64, i64)]) -> RecordBatch {
        let named: Vec<(String, f64, i64)> = rows
            .iter()
            .map(|(c, a, t)| (format!("c{c}"), *a, *t))
            .collect();
        orders_batch(&named)
    }

    #[test]
    fn spec_is_checked_against_the_table() {
        let b = batch(&[]);
        assert!(spec("1m").check(&b.schema()).is_ok());
        let mut wrong = spec("1m");
        wrong.aggregates = parse_aggregates("sum(customer)").expect("aggregates");
        assert!(wrong
            .check(&b.schema())
            .expect_err("not a number")
            .to_string()
            .contains("customer"));
        wrong.key_fields = vec!["nope".into()];
        assert!(wrong.check(&b.schema()).is_err());
    }

    proptest! {
        /// Pre-aggregation equals computing each (window, key) from its events one by one.
        #[test]
        fn preaggregation_equals_per_event_computation(
            rows in prop::collection::vec((0u8..6, -1e4f64..1e4, 0i64..600_000_000), 0..400),
            hopping in any::<bool>(),
        ) {
            let spec = spec(if hopping { "2m every 1m" } else { "1m" });
            let mut pre = PreAggregator::new();
            let folded = pre.add_batch(&spec, &batch(&rows), |_, _, _| true).expect("fold");
            prop_assert_eq!(folded, rows.len());
            let mut expected: BTreeMap<(i64, String), (u64, Vec<f64>)> = BTreeMap::new();
            for (c, amount, t) in &rows {
                for start in spec.window.starts(*t) {
                    let e = expected.entry((start, format!("c{c}"))).or_default();
                    e.0 += 1;
                    e.1.push(*amount);
                }
            }
            let groups = pre.into_groups();
            prop_assert_eq!(groups.len(), expected.len());
            for (start, key, _, acc) in groups {
                let KeyValue::Str(name) = &key[0] else { panic!("string key") };
                let (count, amounts) = &expected[&(start, name.clone())];
                let out = acc.finish();
                prop_assert_eq!(out[0], Output::Int(*count as i64));
                let mut exact = crate::gold::core::aggregate::ExactSum::default();
                amounts.iter().for_each(|a| exact.add(*a));
                prop_assert_eq!(out[1], Output::Float(Some(exact.value())));
                let min = amounts.iter().copied().fold(f64::INFINITY, f64::min);
                let max = amounts.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                prop_assert_eq!(out[2], Output::Float(Some(min)));
                prop_assert_eq!(out[3], Output::Float(Some(max)));
                prop_assert_eq!(out[4], Output::Float(Some(exact.value() / *count as f64)));
            }
        }
    }

    #[test]
    fn hot_keys_of_an_epoch() {
        let rows: Vec<(u8, f64, i64)> = (0..1_000)
            .map(|i| {
                (
                    if i % 5 < 2 { 0 } else { 1 + (i % 50) as u8 },
                    1.0,
                    i as i64,
                )
            })
            .collect();
        let rows = [batch(&rows)];
        assert_eq!(
            PreAggregator::scan_hot(&spec("1m"), &rows, 16, 0.2, 10).expect("scan"),
            vec![vec![KeyValue::Str("c0".into())]]
        );
        assert!(
            PreAggregator::scan_hot(&spec("1m"), &rows, 16, 0.2, 10_000)
                .expect("scan")
                .is_empty(),
            "too few events to salt"
        );
    }
}
