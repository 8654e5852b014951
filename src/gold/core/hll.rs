//! HyperLogLog (precision 12: 4,096 one-byte registers, standard error 1.04/√4096 ≈ 1.6 %) and the
//! stable 64-bit hash the Gold stage uses for sketches, partitioning and salts. The hash must not
//! change between runs or versions: replays must reproduce identical partials.

/// Register-index bits.
pub const PRECISION: u32 = 12;
pub const REGISTERS: usize = 1 << PRECISION;

/// FNV-1a over the bytes, then MurmurHash3's 64-bit finalizer for avalanche. Stable forever.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    fmix64(h)
}

pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Non-zero registers at most held sparse: 1,024 entries of 4 bytes are the 4 KiB a dense sketch
/// takes, so a sketch never holds more than that either way.
const SPARSE_MAX: usize = REGISTERS / 4;

/// The largest rank a register can hold (the sentinel bit caps it).
const MAX_RANK: u32 = 64 - PRECISION + 1;

/// A sketch of 4,096 registers, held sparse (HLL++'s sparse mode: the non-zero registers as sorted
/// `index << 8 | rank` entries) while at most [`SPARSE_MAX`] are set, dense after. Most groups of
/// a window see few distinct values, so they take bytes, not 4 KiB. The form follows from the
/// registers alone (dense exactly when more than `SPARSE_MAX` are set), so equal registers are
/// equal sketches, and estimates and encodings are the same in either form.
#[derive(Clone, PartialEq, Eq)]
pub struct Hll {
    registers: Registers,
}

#[derive(Clone, PartialEq, Eq)]
enum Registers {
    Sparse(Vec<u32>),
    Dense(Box<[u8; REGISTERS]>),
}

impl std::fmt::Debug for Hll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hll(~{:.0})", self.estimate())
    }
}

impl Default for Hll {
    fn default() -> Self {
        Self {
            registers: Registers::Sparse(Vec::new()),
        }
    }
}

fn entry(index: usize, rank: u8) -> u32 {
    ((index as u32) << 8) | u32::from(rank)
}

impl Hll {
    pub fn add_hash(&mut self, hash: u64) {
        let index = (hash >> (64 - PRECISION)) as usize;
        // The remaining bits, with a sentinel so the rank is at most 64 - PRECISION + 1.
        let rest = (hash << PRECISION) | (1 << (PRECISION - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        self.raise(index, rank);
    }

    pub fn add(&mut self, bytes: &[u8]) {
        self.add_hash(hash64(bytes));
    }

    /// Sets register `index` to at least `rank`.
    fn raise(&mut self, index: usize, rank: u8) {
        match &mut self.registers {
            Registers::Dense(registers) => {
                if rank > registers[index] {
                    registers[index] = rank;
                }
            }
            Registers::Sparse(entries) => {
                match entries.binary_search_by_key(&index, |e| (*e >> 8) as usize) {
                    Ok(at) => {
                        if u32::from(rank) > entries[at] & 0xff {
                            entries[at] = entry(index, rank);
                        }
                    }
                    Err(at) => {
                        entries.insert(at, entry(index, rank));
                        if entries.len() > SPARSE_MAX {
                            self.densify();
                        }
                    }
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Registers::Sparse(entries) = &self.registers {
            let mut dense = Box::new([0u8; REGISTERS]);
            for e in entries {
                dense[(*e >> 8) as usize] = (*e & 0xff) as u8;
            }
            self.registers = Registers::Dense(dense);
        }
    }

    /// The non-zero registers as (index, rank), in index order.
    fn set(&self) -> Vec<(usize, u8)> {
        match &self.registers {
            Registers::Sparse(entries) => entries
                .iter()
                .map(|e| ((*e >> 8) as usize, (*e & 0xff) as u8))
                .collect(),
            Registers::Dense(registers) => registers
                .iter()
                .enumerate()
                .filter(|(_, r)| **r != 0)
                .map(|(i, r)| (i, *r))
                .collect(),
        }
    }

    /// Union: the sketch of both inputs (commutative, associative, idempotent).
    pub fn merge(&mut self, other: &Hll) {
        match &other.registers {
            Registers::Dense(theirs) => {
                self.densify();
                if let Registers::Dense(mine) = &mut self.registers {
                    for (mine, theirs) in mine.iter_mut().zip(theirs.iter()) {
                        *mine = (*mine).max(*theirs);
                    }
                }
            }
            Registers::Sparse(entries) => {
                for e in entries {
                    self.raise((*e >> 8) as usize, (*e & 0xff) as u8);
                }
            }
        }
    }

    /// Heap bytes this sketch holds (for Gold's state accounting).
    pub fn heap_bytes(&self) -> usize {
        match &self.registers {
            Registers::Sparse(entries) => entries.capacity() * std::mem::size_of::<u32>(),
            Registers::Dense(_) => REGISTERS,
        }
    }

    /// The estimated number of distinct values (with linear counting for small cardinalities).
    pub fn estimate(&self) -> f64 {
        let m = REGISTERS as f64;
        let set = self.set();
        // Registers at zero add 2^0 each.
        let zeros = REGISTERS - set.len();
        let mut sum = zeros as f64;
        for (_, r) in &set {
            sum += 2f64.powi(-i32::from(*r));
        }
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }

    /// Compact bytes: the non-zero registers as (index u16, rank u8) when fewer than a third are
    /// set, else all registers. First byte: 0 sparse, 1 dense. (The same bytes whichever form the
    /// sketch is held in.)
    pub fn encode(&self, out: &mut Vec<u8>) {
        let set = self.set();
        if set.len() * 3 < REGISTERS {
            out.push(0);
            out.extend_from_slice(&(set.len() as u16).to_le_bytes());
            for (i, r) in set {
                out.extend_from_slice(&(i as u16).to_le_bytes());
                out.push(r);
            }
        } else {
            out.push(1);
            let mut all = [0u8; REGISTERS];
            for (i, r) in set {
                all[i] = r;
            }
            out.extend_from_slice(&all);
        }
    }

    /// Reads what [`Self::encode`] wrote from the front of `bytes`; returns the sketch and the
    /// bytes used. `None` for anything malformed (never panics, never allocates beyond 4 KiB).
    pub fn decode(bytes: &[u8]) -> Option<(Self, usize)> {
        let mut hll = Hll::default();
        match *bytes.first()? {
            0 => {
                let n = u16::from_le_bytes([*bytes.get(1)?, *bytes.get(2)?]) as usize;
                if n > REGISTERS {
                    return None;
                }
                let body = bytes.get(3..3 + 3 * n)?;
                let mut previous = None;
                for entry in body.chunks_exact(3) {
                    let index = u16::from_le_bytes([entry[0], entry[1]]) as usize;
                    let rank = entry[2];
                    // Strictly increasing indices, as `encode` writes them.
                    if index >= REGISTERS
                        || rank == 0
                        || u32::from(rank) > MAX_RANK
                        || previous.is_some_and(|p| p >= index)
                    {
                        return None;
                    }
                    previous = Some(index);
                    hll.raise(index, rank);
                }
                Some((hll, 3 + 3 * n))
            }
            1 => {
                let body = bytes.get(1..1 + REGISTERS)?;
                if body.iter().any(|r| u32::from(*r) > MAX_RANK) {
                    return None;
                }
                for (index, rank) in body.iter().enumerate() {
                    if *rank != 0 {
                        hll.raise(index, *rank);
                    }
                }
                Some((hll, 1 + REGISTERS))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn estimates_within_the_stated_error() {
        for n in [10usize, 1_000, 50_000, 300_000] {
            let mut hll = Hll::default();
            for i in 0..n {
                hll.add(format!("user-{i}").as_bytes());
                hll.add(format!("user-{}", i / 2).as_bytes()); // duplicates do not count
            }
            let error = (hll.estimate() - n as f64).abs() / n as f64;
            // 3 standard errors.
            assert!(
                error < 0.05,
                "n={n}: estimate {} error {error}",
                hll.estimate()
            );
        }
        assert_eq!(Hll::default().estimate(), 0.0);
    }

    #[test]
    fn small_sketches_stay_small() {
        let mut hll = Hll::default();
        for i in 0..20 {
            hll.add(format!("user-{i}").as_bytes());
        }
        assert!(hll.heap_bytes() <= 32 * 4, "{}", hll.heap_bytes());
        for i in 0..100_000 {
            hll.add(format!("user-{i}").as_bytes());
        }
        assert_eq!(hll.heap_bytes(), REGISTERS);
    }

    proptest! {
        #[test]
        fn merge_equals_the_sketch_of_the_union(a in prop::collection::vec(any::<u32>(), 0..500), b in prop::collection::vec(any::<u32>(), 0..500)) {
            let sketch = |xs: &[u32]| { let mut h = Hll::default(); for x in xs { h.add(&x.to_le_bytes()); } h };
            let mut merged = sketch(&a);
            merged.merge(&sketch(&b));
            let all: Vec<u32> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(&merged, &sketch(&all));
            let mut other_order = sketch(&b);
            other_order.merge(&sketch(&a));
            prop_assert_eq!(&merged, &other_order);
        }

        /// Held sparse or dense, a sketch of the same values is the same sketch: same estimate,
        /// same bytes; and it never holds more than 4 KiB of registers.
        #[test]
        fn the_sparse_form_agrees_with_the_dense_one(xs in prop::collection::vec(any::<u64>(), 0..3000)) {
            let mut sparse_built = Hll::default();
            let mut dense = Hll::default();
            dense.densify();
            for x in &xs {
                sparse_built.add_hash(*x);
                dense.add_hash(*x);
            }
            prop_assert!(sparse_built.heap_bytes() <= REGISTERS);
            prop_assert_eq!(sparse_built.estimate(), dense.estimate());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            sparse_built.encode(&mut a);
            dense.encode(&mut b);
            prop_assert_eq!(&a, &b);
            let (back, _) = Hll::decode(&a).expect("decodes");
            prop_assert_eq!(back, sparse_built);
        }

        #[test]
        fn encoding_round_trips_and_garbage_never_panics(xs in prop::collection::vec(any::<u64>(), 0..3000), junk in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut hll = Hll::default();
            for x in &xs { hll.add_hash(*x); }
            let mut bytes = Vec::new();
            hll.encode(&mut bytes);
            let (back, used) = Hll::decode(&bytes).expect("decodes");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, hll);
            let _ = Hll::decode(&junk);
        }
    }
}
