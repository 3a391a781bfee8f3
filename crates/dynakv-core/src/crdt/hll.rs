//! HyperLogLog (Flajolet et al. 2007): `2^p` registers, each the largest rank (leading zeros
//! of the hash's remaining bits, plus one) of the elements that hash to it; merge is the
//! register-wise maximum. The estimate's relative standard error is about `1.04 / sqrt(2^p)`:
//! 0.81% at the default `p` = 14 (16 KiB of registers), 3.25% at 10, 26% at the minimum 4.
//! Small cardinalities use linear counting (empty registers), as the paper's correction.

use super::{CrdtError, check_element};
use crate::codec::{DecodeError, Reader, Writer};

/// Riak's default precision.
pub const DEFAULT_HLL_PRECISION: u8 = 14;
pub const MIN_HLL_PRECISION: u8 = 4;
pub const MAX_HLL_PRECISION: u8 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hll {
    precision: u8,
    registers: Vec<u8>,
}

impl Default for Hll {
    fn default() -> Self {
        Hll::new(DEFAULT_HLL_PRECISION).unwrap_or_else(|_| Hll {
            precision: MIN_HLL_PRECISION,
            registers: vec![0; 1 << MIN_HLL_PRECISION],
        })
    }
}

impl Hll {
    /// An empty estimator of `2^precision` registers.
    pub fn new(precision: u8) -> Result<Hll, CrdtError> {
        if !(MIN_HLL_PRECISION..=MAX_HLL_PRECISION).contains(&precision) {
            return Err(CrdtError::Malformed(DecodeError::Invalid(
                "hll precision must be from 4 to 16",
            )));
        }
        Ok(Hll {
            precision,
            registers: vec![0; 1 << precision],
        })
    }

    pub fn precision(&self) -> u8 {
        self.precision
    }

    pub fn add(&mut self, element: &[u8]) -> Result<(), CrdtError> {
        check_element(element)?;
        let hash = blake3::hash(element);
        let mut word = [0u8; 8];
        word.copy_from_slice(&hash.as_bytes()[..8]);
        let hash = u64::from_le_bytes(word);
        let p = u32::from(self.precision);
        let index = (hash >> (64 - p)) as usize;
        // The rank of the other 64 - p bits: their leading zeros plus one.
        let rest = hash << p;
        let rank = (rest.leading_zeros().min(64 - p) + 1) as u8;
        if let Some(register) = self.registers.get_mut(index) {
            *register = (*register).max(rank);
        }
        Ok(())
    }

    /// The estimated number of distinct elements added.
    pub fn estimate(&self) -> u64 {
        let m = self.registers.len() as f64;
        let alpha = match self.registers.len() {
            16 => 0.673,
            32 => 0.697,
            64 => 0.709,
            _ => 0.7213 / (1.0 + 1.079 / m),
        };
        let sum: f64 = self
            .registers
            .iter()
            .map(|r| 2f64.powi(-i32::from(*r)))
            .sum();
        let raw = alpha * m * m / sum;
        #[allow(clippy::naive_bytecount)] // 16 KiB at most; no crate for this
        let zeros = self.registers.iter().filter(|r| **r == 0).count();
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    /// Register-wise maximum. Estimators of different precisions are folded to the smaller
    /// one first (a register of the larger is the maximum of its group, as Riak's does).
    pub fn merge(&mut self, other: &Hll) {
        let mut other = other.clone();
        if other.precision > self.precision {
            other = other.folded(self.precision);
        } else if other.precision < self.precision {
            *self = self.folded(other.precision);
        }
        for (mine, theirs) in self.registers.iter_mut().zip(&other.registers) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// The same elements at a smaller precision.
    fn folded(&self, precision: u8) -> Hll {
        let shift = u32::from(self.precision - precision);
        let mut folded = vec![0u8; 1 << precision];
        for (index, rank) in self.registers.iter().enumerate() {
            if *rank == 0 {
                continue;
            }
            // The low bits of the old index move into the rank's bits.
            let low = index & ((1 << shift) - 1);
            let new_rank = if low == 0 {
                *rank + shift as u8
            } else {
                (shift - (low as u32).ilog2()) as u8
            };
            let slot = &mut folded[index >> shift];
            *slot = (*slot).max(new_rank);
        }
        Hll {
            precision,
            registers: folded,
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        w.u8(self.precision);
        w.bytes(&self.registers);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Hll, DecodeError> {
        let precision = r.u8()?;
        if !(MIN_HLL_PRECISION..=MAX_HLL_PRECISION).contains(&precision) {
            return Err(DecodeError::Invalid("hll precision out of range"));
        }
        let registers = r.bytes(1 << MAX_HLL_PRECISION, "hll registers")?.to_vec();
        if registers.len() != 1 << precision
            || registers
                .iter()
                .any(|r| u32::from(*r) > 65 - u32::from(precision))
        {
            return Err(DecodeError::Invalid(
                "hll registers do not fit the precision",
            ));
        }
        Ok(Hll {
            precision,
            registers,
        })
    }
}
