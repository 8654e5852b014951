//! Aggregate functions and their mergeable accumulators. Merging partial accumulators in any order
//! and grouping gives exactly what accumulating every event at once gives: counts are integers,
//! sums are exact (Shewchuk's non-overlapping partials, rounded once at the end like Python's
//! `math.fsum`), min and max are order-free, and HyperLogLog merges are unions.

use std::fmt;
use std::str::FromStr;

use super::hll::Hll;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    ApproxDistinct,
}

/// One aggregate of `STRATA_GOLD_AGGREGATES`, e.g. `sum(amount)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub function: Function,
    /// The input field (none for `count`).
    pub field: Option<String>,
}

impl Aggregate {
    /// The Gold column: `count`, `sum_amount`, `approx_distinct_user_id`, …
    pub fn column(&self) -> String {
        let name = match self.function {
            Function::Count => "count",
            Function::Sum => "sum",
            Function::Min => "min",
            Function::Max => "max",
            Function::Avg => "avg",
            Function::ApproxDistinct => "approx_distinct",
        };
        match &self.field {
            Some(field) => format!("{name}_{field}"),
            None => name.to_string(),
        }
    }

    /// Whether the input is a number (all but `count` and `approx_distinct`).
    pub fn numeric(&self) -> bool {
        matches!(
            self.function,
            Function::Sum | Function::Min | Function::Max | Function::Avg
        )
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.function, &self.field) {
            (Function::Count, _) => f.write_str("count"),
            (function, Some(field)) => {
                write!(f, "{}({field})", format!("{function:?}").to_lowercase())
            }
            (function, None) => write!(f, "{function:?}"),
        }
    }
}

/// Why an aggregates setting cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("{0:?}: expected function(field) or count")]
    Shape(String),
    #[error("{0:?}: expected a field name inside the parentheses")]
    Field(String),
    #[error(
        "{item:?}: unknown function {function:?} (count, sum, min, max, avg, approx_distinct)"
    )]
    UnknownFunction { item: String, function: String },
    #[error("{0} is listed twice")]
    Twice(String),
    #[error("no aggregate given")]
    None,
}

/// Parses `count, sum(amount), min(amount), max(amount), avg(amount), approx_distinct(user_id)`.
pub fn parse_aggregates(text: &str) -> Result<Vec<Aggregate>, AggregateError> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let aggregate = item.parse::<Aggregate>()?;
        if out.contains(&aggregate) {
            return Err(AggregateError::Twice(item.to_string()));
        }
        out.push(aggregate);
    }
    if out.is_empty() {
        return Err(AggregateError::None);
    }
    Ok(out)
}

impl FromStr for Aggregate {
    type Err = AggregateError;

    fn from_str(item: &str) -> Result<Self, Self::Err> {
        let lower = item.trim().to_ascii_lowercase();
        if lower == "count" || lower == "count(*)" {
            return Ok(Aggregate {
                function: Function::Count,
                field: None,
            });
        }
        let (name, rest) = lower
            .split_once('(')
            .ok_or_else(|| AggregateError::Shape(item.to_string()))?;
        let field = rest
            .strip_suffix(')')
            .map(str::trim)
            .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .ok_or_else(|| AggregateError::Field(item.to_string()))?;
        let function = match name.trim() {
            "sum" => Function::Sum,
            "min" => Function::Min,
            "max" => Function::Max,
            "avg" => Function::Avg,
            "approx_distinct" => Function::ApproxDistinct,
            other => {
                return Err(AggregateError::UnknownFunction {
                    item: item.to_string(),
                    function: other.to_string(),
                })
            }
        };
        Ok(Aggregate {
            function,
            field: Some(field.to_string()),
        })
    }
}

/// An exact sum of doubles: non-overlapping partials whose sum is the exact value.
#[derive(Debug, Clone, Default)]
pub struct ExactSum {
    partials: Vec<f64>,
    /// Infinities and NaNs, summed naively (they make the result non-finite anyway).
    special: f64,
}

impl ExactSum {
    pub fn add(&mut self, value: f64) {
        if !value.is_finite() {
            self.special += value;
            return;
        }
        let mut x = value;
        let mut kept = 0;
        for i in 0..self.partials.len() {
            let mut y = self.partials[i];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            if !hi.is_finite() {
                // The exact sum left the range of f64: it is ±infinity from now on.
                self.special += hi;
                self.partials.clear();
                return;
            }
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        if !x.is_finite() {
            // Overflow of finite values: keep the infinity, it is the honest answer.
            self.special += x;
            self.partials.truncate(kept);
            return;
        }
        self.partials.truncate(kept);
        self.partials.push(x);
    }

    pub fn merge(&mut self, other: &ExactSum) {
        for p in &other.partials {
            self.add(*p);
        }
        self.special += other.special;
    }

    /// The exact sum, correctly rounded once.
    pub fn value(&self) -> f64 {
        if self.special != 0.0 || self.special.is_nan() {
            return self.special + self.partials.iter().sum::<f64>();
        }
        let p = &self.partials;
        let Some(mut n) = p.len().checked_sub(1) else {
            return 0.0;
        };
        let mut hi = p[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = p[n];
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }
}

/// One input value of one aggregate, for one event.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Number(f64),
    /// An integer: a number for the numeric aggregates, its 8 bytes for `approx_distinct`.
    Int(i64),
    Bytes(&'a [u8]),
    Null,
}

#[derive(Debug, Clone)]
pub enum State {
    Count(u64),
    Sum(ExactSum),
    Min(Option<f64>),
    Max(Option<f64>),
    Avg(ExactSum, u64),
    Distinct(Hll),
}

fn add_number(state: &mut State, x: f64) {
    match state {
        State::Count(_) => {}
        State::Sum(sum) => sum.add(x),
        State::Min(m) if !x.is_nan() => *m = Some(m.map_or(x, |m| m.min(x))),
        State::Max(m) if !x.is_nan() => *m = Some(m.map_or(x, |m| m.max(x))),
        State::Avg(sum, n) => {
            sum.add(x);
            *n += 1;
        }
        State::Distinct(hll) => hll.add(&x.to_bits().to_le_bytes()),
        _ => {}
    }
}

/// A final Gold value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    Int(i64),
    Float(Option<f64>),
}

/// The accumulators of every aggregate for one (window, key).
#[derive(Debug, Clone)]
pub struct Accumulator {
    pub states: Vec<State>,
}

impl Accumulator {
    /// Bytes this accumulator holds on the heap (for Gold's state accounting).
    pub fn heap_bytes(&self) -> usize {
        let states = self.states.capacity() * std::mem::size_of::<State>();
        let inner: usize = self
            .states
            .iter()
            .map(|state| match state {
                State::Sum(sum) | State::Avg(sum, _) => {
                    sum.partials.capacity() * std::mem::size_of::<f64>()
                }
                State::Distinct(hll) => hll.heap_bytes(),
                _ => 0,
            })
            .sum();
        states + inner
    }

    pub fn new(aggregates: &[Aggregate]) -> Self {
        Self {
            states: aggregates
                .iter()
                .map(|a| match a.function {
                    Function::Count => State::Count(0),
                    Function::Sum => State::Sum(ExactSum::default()),
                    Function::Min => State::Min(None),
                    Function::Max => State::Max(None),
                    Function::Avg => State::Avg(ExactSum::default(), 0),
                    Function::ApproxDistinct => State::Distinct(Hll::default()),
                })
                .collect(),
        }
    }

    /// Adds one event; `inputs` has one value per aggregate. Nulls are skipped (SQL semantics);
    /// `count` counts events.
    pub fn add(&mut self, inputs: &[Input<'_>]) {
        for (state, input) in self.states.iter_mut().zip(inputs) {
            match (state, *input) {
                (State::Count(n), _) => *n += 1,
                (State::Distinct(hll), Input::Int(v)) => hll.add(&v.to_le_bytes()),
                (state, Input::Int(v)) => add_number(state, v as f64),
                (state, Input::Number(x)) => add_number(state, x),
                (State::Distinct(hll), Input::Bytes(bytes)) => hll.add(bytes),
                _ => {}
            }
        }
    }

    /// Adds another accumulator of the same aggregates.
    pub fn merge(&mut self, other: &Accumulator) {
        for (mine, theirs) in self.states.iter_mut().zip(&other.states) {
            match (mine, theirs) {
                (State::Count(a), State::Count(b)) => *a += b,
                (State::Sum(a), State::Sum(b)) => a.merge(b),
                (State::Min(a), State::Min(b)) => {
                    *a = match (*a, *b) {
                        (Some(x), Some(y)) => Some(x.min(y)),
                        (x, y) => x.or(y),
                    }
                }
                (State::Max(a), State::Max(b)) => {
                    *a = match (*a, *b) {
                        (Some(x), Some(y)) => Some(x.max(y)),
                        (x, y) => x.or(y),
                    }
                }
                (State::Avg(a, n), State::Avg(b, m)) => {
                    a.merge(b);
                    *n += m;
                }
                (State::Distinct(a), State::Distinct(b)) => a.merge(b),
                _ => {}
            }
        }
    }

    /// Events counted (the first `count`, or the largest event count any state knows).
    pub fn events(&self) -> u64 {
        self.states
            .iter()
            .find_map(|s| match s {
                State::Count(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// The final values, one per aggregate.
    pub fn finish(&self) -> Vec<Output> {
        self.states
            .iter()
            .map(|s| match s {
                State::Count(n) => Output::Int(*n as i64),
                State::Sum(sum) => Output::Float(Some(sum.value())),
                State::Min(m) | State::Max(m) => Output::Float(*m),
                State::Avg(sum, n) => Output::Float((*n > 0).then(|| sum.value() / *n as f64)),
                State::Distinct(hll) => Output::Int(hll.estimate().round() as i64),
            })
            .collect()
    }

    /// Appends the states to `out` (the partials' wire format).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let sum = |out: &mut Vec<u8>, s: &ExactSum| {
            out.push(s.partials.len() as u8);
            for p in &s.partials {
                out.extend_from_slice(&p.to_le_bytes());
            }
            out.extend_from_slice(&s.special.to_le_bytes());
        };
        let option = |out: &mut Vec<u8>, v: &Option<f64>| match v {
            Some(x) => {
                out.push(1);
                out.extend_from_slice(&x.to_le_bytes());
            }
            None => out.push(0),
        };
        for state in &self.states {
            match state {
                State::Count(n) => out.extend_from_slice(&n.to_le_bytes()),
                State::Sum(s) => sum(out, s),
                State::Min(m) | State::Max(m) => option(out, m),
                State::Avg(s, n) => {
                    sum(out, s);
                    out.extend_from_slice(&n.to_le_bytes());
                }
                State::Distinct(hll) => hll.encode(out),
            }
        }
    }

    /// Reads states of `aggregates` from the front of `bytes`; returns them and the bytes used.
    /// `None` for anything malformed.
    pub fn decode(aggregates: &[Aggregate], bytes: &[u8]) -> Option<(Self, usize)> {
        let mut cursor = Cursor { bytes, at: 0 };
        let mut states = Vec::with_capacity(aggregates.len());
        for aggregate in aggregates {
            let state = match aggregate.function {
                Function::Count => State::Count(cursor.u64()?),
                Function::Sum => State::Sum(cursor.sum()?),
                Function::Min | Function::Max => {
                    let value = match cursor.take(1)?[0] {
                        0 => None,
                        1 => Some(cursor.f64()?),
                        _ => return None,
                    };
                    if aggregate.function == Function::Min {
                        State::Min(value)
                    } else {
                        State::Max(value)
                    }
                }
                Function::Avg => {
                    let sum = cursor.sum()?;
                    State::Avg(sum, cursor.u64()?)
                }
                Function::ApproxDistinct => {
                    let (hll, used) = Hll::decode(cursor.bytes.get(cursor.at..)?)?;
                    cursor.at += used;
                    State::Distinct(hll)
                }
            };
            states.push(state);
        }
        Some((Self { states }, cursor.at))
    }
}

/// Bounds-checked reads from the front of a byte slice (every binary format of Gold uses it).
pub(crate) struct Cursor<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.at..).unwrap_or_default()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(crate) fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(crate) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn sum(&mut self) -> Option<ExactSum> {
        let n = self.take(1)?[0] as usize;
        if n > 64 {
            return None;
        }
        let mut partials = Vec::with_capacity(n);
        for _ in 0..n {
            partials.push(self.f64()?);
        }
        let special = self.f64()?;
        Some(ExactSum { partials, special })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all() -> Vec<Aggregate> {
        parse_aggregates(
            "count, sum(amount), min(amount), max(amount), avg(amount), approx_distinct(user_id)",
        )
        .expect("aggregates")
    }

    #[test]
    fn parses_aggregates_and_names_columns() {
        let columns: Vec<String> = all().iter().map(Aggregate::column).collect();
        assert_eq!(
            columns,
            [
                "count",
                "sum_amount",
                "min_amount",
                "max_amount",
                "avg_amount",
                "approx_distinct_user_id"
            ]
        );
        assert!(parse_aggregates("median(amount)").is_err());
        assert!(parse_aggregates("sum()").is_err());
        assert!(parse_aggregates("count, count").is_err());
        assert!(parse_aggregates("").is_err());
    }

    #[test]
    fn exact_sums_do_not_depend_on_order() {
        let values = [1e16, 1.0, -1e16, 0.1, 0.2, 0.3, 1e-300, -0.3];
        let mut forward = ExactSum::default();
        values.iter().for_each(|v| forward.add(*v));
        let mut backward = ExactSum::default();
        values.iter().rev().for_each(|v| backward.add(*v));
        assert_eq!(forward.value(), backward.value());
        // 1 + 0.1 + 0.2 (the exact sum of those doubles, rounded once)
        assert_eq!(forward.value(), 1.0 + 0.1 + 0.2);
        let mut inf = ExactSum::default();
        inf.add(f64::MAX);
        inf.add(f64::MAX);
        assert_eq!(inf.value(), f64::INFINITY);
    }

    fn accumulate(rows: &[(f64, u32)], aggregates: &[Aggregate]) -> Accumulator {
        let mut acc = Accumulator::new(aggregates);
        for (amount, user) in rows {
            let user = user.to_le_bytes();
            let inputs: Vec<Input<'_>> = aggregates
                .iter()
                .map(|a| match a.function {
                    Function::Count => Input::Null,
                    Function::ApproxDistinct => Input::Bytes(&user),
                    _ => Input::Number(*amount),
                })
                .collect();
            acc.add(&inputs);
        }
        acc
    }

    proptest! {
        /// Merging partials in any order and grouping equals aggregating every event at once.
        #[test]
        fn merge_in_any_order_and_grouping_equals_the_whole(
            rows in prop::collection::vec((-1e9f64..1e9, 0u32..500), 0..300),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            order in any::<u64>(),
        ) {
            let aggregates = all();
            let whole = accumulate(&rows, &aggregates);
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(rows.len() + 1)).collect();
            bounds.push(0);
            bounds.push(rows.len());
            bounds.sort_unstable();
            let mut parts: Vec<Accumulator> = bounds
                .windows(2)
                .map(|w| accumulate(&rows[w[0]..w[1]], &aggregates))
                .collect();
            // A deterministic shuffle, then a tree of merges of uneven shape.
            let mut seed = order;
            for i in (1..parts.len()).rev() {
                seed = super::super::hll::fmix64(seed.wrapping_add(i as u64));
                parts.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            while parts.len() > 1 {
                let b = parts.pop().expect("part");
                let at = (seed as usize) % parts.len();
                parts[at].merge(&b);
                seed = super::super::hll::fmix64(seed);
            }
            let merged = parts.pop().unwrap_or_else(|| Accumulator::new(&aggregates));
            prop_assert_eq!(merged.finish(), whole.finish());

            let mut bytes = Vec::new();
            merged.encode(&mut bytes);
            let (back, used) = Accumulator::decode(&aggregates, &bytes).expect("decodes");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back.finish(), whole.finish());
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Accumulator::decode(&all(), &bytes);
        }
    }
}
