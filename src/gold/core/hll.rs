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

#[derive(Clone, PartialEq, Eq)]
pub struct Hll {
    registers: Box<[u8; REGISTERS]>,
}

impl std::fmt::Debug for Hll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hll(~{:.0})", self.estimate())
    }
}

impl Default for Hll {
    fn default() -> Self {
        Self {
            registers: Box::new([0; REGISTERS]),
        }
    }
}

impl Hll {
    pub fn add_hash(&mut self, hash: u64) {
        let index = (hash >> (64 - PRECISION)) as usize;
        // The remaining bits, with a sentinel so the rank is at most 64 - PRECISION + 1.
        let rest = (hash << PRECISION) | (1 << (PRECISION - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if rank > self.registers[index] {
            self.registers[index] = rank;
        }
    }

    pub fn add(&mut self, bytes: &[u8]) {
        self.add_hash(hash64(bytes));
    }

    /// Union: the sketch of both inputs (commutative, associative, idempotent).
    pub fn merge(&mut self, other: &Hll) {
        for (mine, theirs) in self.registers.iter_mut().zip(other.registers.iter()) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// The estimated number of distinct values (with linear counting for small cardinalities).
    pub fn estimate(&self) -> f64 {
        let m = REGISTERS as f64;
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for &r in self.registers.iter() {
            sum += 2f64.powi(-i32::from(r));
            if r == 0 {
                zeros += 1;
            }
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
    /// set, else all registers. First byte: 0 sparse, 1 dense.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let set: Vec<(usize, u8)> = self
            .registers
            .iter()
            .enumerate()
            .filter(|(_, r)| **r != 0)
            .map(|(i, r)| (i, *r))
            .collect();
        if set.len() * 3 < REGISTERS {
            out.push(0);
            out.extend_from_slice(&(set.len() as u16).to_le_bytes());
            for (i, r) in set {
                out.extend_from_slice(&(i as u16).to_le_bytes());
                out.push(r);
            }
        } else {
            out.push(1);
            out.extend_from_slice(&self.registers[..]);
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
                for entry in body.chunks_exact(3) {
                    let index = u16::from_le_bytes([entry[0], entry[1]]) as usize;
                    let rank = entry[2];
                    if index >= REGISTERS || rank == 0 || rank as u32 > 64 - PRECISION + 1 {
                        return None;
                    }
                    hll.registers[index] = rank;
                }
                Some((hll, 3 + 3 * n))
            }
            1 => {
                let body = bytes.get(1..1 + REGISTERS)?;
                if body.iter().any(|r| u32::from(*r) > 64 - PRECISION + 1) {
                    return None;
                }
                hll.registers.copy_from_slice(body);
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
