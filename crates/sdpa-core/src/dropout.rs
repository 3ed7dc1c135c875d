//! The dropout stream every backend shares (DESIGN.md, "Dropout").
//!
//! The keep/drop bit of attention element `(b, h, i, j)` of `[B, Hq, L, S]` depends only
//! on `(seed, offset, b, h, i, j)`: Philox4x32-10 keyed by the seed, counter
//! `offset + n / 4` for the flat index `n = ((b*Hq + h)*L + i)*S + j`, word `n % 4`.

use crate::error::{Result, SdpaError};

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let product = a as u64 * b as u64;
    ((product >> 32) as u32, product as u32)
}

/// Philox4x32 with 10 rounds, exactly as Random123 defines it.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = counter;
    let mut key = key;
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, ctr[0]);
        let (hi1, lo1) = mulhilo(PHILOX_M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// Attention dropout: probability `p` of dropping each attention weight, and the
/// Philox `seed` and counter `offset` that make the draw reproducible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, in `[0, 1]`.
    pub p: f64,
    /// Philox key (low word first).
    pub seed: u64,
    /// First Philox counter this call uses.
    pub offset: u64,
}

impl Default for Dropout {
    fn default() -> Self {
        Dropout::NONE
    }
}

impl Dropout {
    /// No dropout.
    pub const NONE: Dropout = Dropout {
        p: 0.0,
        seed: 0,
        offset: 0,
    };

    /// Dropout with probability `p` from stream `(seed, offset)`.
    pub fn new(p: f64, seed: u64, offset: u64) -> Self {
        Dropout { p, seed, offset }
    }

    /// True when this drops anything at all.
    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// `Err` unless `p` is a number in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.p.is_nan() || !(0.0..=1.0).contains(&self.p) {
            return Err(SdpaError::invalid(
                "dropout_p",
                "a number in [0, 1]",
                self.p,
            ));
        }
        Ok(())
    }

    /// `t` of the spec as a u64: an element with Philox word `x` is kept iff `x >= t`.
    /// `floor(p * 2^32)` for `p < 1`; for `p = 1` it is `2^32`, above every word, so
    /// everything is dropped (the spec's `min(.., 2^32 - 1)` would keep `x = 2^32 - 1`).
    pub fn keep_threshold(&self) -> u64 {
        if self.p >= 1.0 {
            1u64 << 32
        } else {
            ((self.p * 4_294_967_296.0).floor() as u64).min(u32::MAX as u64)
        }
    }

    /// Factor applied to kept weights: `1 / (1 - p)`, or 0 when everything is dropped.
    pub fn keep_scale(&self) -> f64 {
        if self.p >= 1.0 {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    /// Counters one call over `[B, Hq, L, S]` consumes: `ceil(B*Hq*L*S / 4)`. The caller
    /// advances `offset` by this before the next call.
    ///
    /// # Panics
    /// When the count does not fit in a u64 (never for the dims of a validated
    /// [`Problem`](crate::Problem)); [`Dropout::checked_counters_used`] returns `None`.
    pub fn counters_used(batch: usize, heads_q: usize, len_q: usize, len_kv: usize) -> u64 {
        Self::checked_counters_used(batch, heads_q, len_q, len_kv).unwrap_or_else(|| {
            panic!(
                "Dropout::counters_used: ceil({batch}*{heads_q}*{len_q}*{len_kv} / 4) overflows u64"
            )
        })
    }

    /// `ceil(B*Hq*L*S / 4)`, or `None` when `B*Hq*L*S` does not fit in a u64 (the flat
    /// index `n` of the spec is a u64).
    pub fn checked_counters_used(
        batch: usize,
        heads_q: usize,
        len_q: usize,
        len_kv: usize,
    ) -> Option<u64> {
        let dims = [batch, heads_q, len_q, len_kv];
        if dims.contains(&0) {
            return Some(0);
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))?;
        Some(elements.div_ceil(4))
    }

    /// The same stream advanced past one call over `[B, Hq, L, S]`.
    ///
    /// # Panics
    /// When `offset + ceil(B*Hq*L*S / 4)` overflows u64: the stream would wrap and
    /// repeat counters an earlier call used. A validated [`Problem`](crate::Problem)
    /// guarantees it does not; [`Dropout::checked_advanced`] returns `None` instead.
    pub fn advanced(&self, batch: usize, heads_q: usize, len_q: usize, len_kv: usize) -> Self {
        self.checked_advanced(batch, heads_q, len_q, len_kv)
            .unwrap_or_else(|| {
                panic!(
                    "Dropout::advanced: offset {} plus the counters of [{batch}, {heads_q}, {len_q}, {len_kv}] overflows u64",
                    self.offset
                )
            })
    }

    /// The same stream advanced past one call over `[B, Hq, L, S]`, or `None` when the
    /// new offset does not fit in a u64.
    pub fn checked_advanced(
        &self,
        batch: usize,
        heads_q: usize,
        len_q: usize,
        len_kv: usize,
    ) -> Option<Self> {
        let used = Self::checked_counters_used(batch, heads_q, len_q, len_kv)?;
        Some(Dropout {
            offset: self.offset.checked_add(used)?,
            ..*self
        })
    }

    /// `Err` naming `dropout_offset` unless the counters one call over
    /// `[B, Hq, L, S]` uses, `offset .. offset + ceil(B*Hq*L*S / 4)`, fit in a u64
    /// (so no counter repeats within the call and [`Dropout::advanced`] cannot wrap).
    pub fn validate_counters(
        &self,
        batch: usize,
        heads_q: usize,
        len_q: usize,
        len_kv: usize,
    ) -> Result<()> {
        let Some(used) = Self::checked_counters_used(batch, heads_q, len_q, len_kv) else {
            return Err(SdpaError::invalid(
                "query",
                "dims whose dropout index space B*Hq*L*S fits in u64",
                format!("[{batch}, {heads_q}, {len_q}, {len_kv}]"),
            ));
        };
        if self.offset.checked_add(used).is_none() {
            return Err(SdpaError::invalid(
                "dropout_offset",
                format!(
                    "an offset of at most {} (2^64 - 1 minus the {used} Philox counters the call uses)",
                    u64::MAX - used
                ),
                self.offset,
            ));
        }
        Ok(())
    }

    /// The four Philox words of counter `offset + block`. The Philox counter is taken
    /// modulo 2^64, as the kernels take it; a validated [`Problem`](crate::Problem)
    /// guarantees that no block of the call wraps ([`Dropout::validate_counters`]).
    #[inline]
    pub fn words(&self, block: u64) -> [u32; 4] {
        let counter = self.offset.wrapping_add(block);
        philox4x32_10(
            [counter as u32, (counter >> 32) as u32, 0, 0],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Philox word of flat element index `n`.
    #[inline]
    pub fn word(&self, n: u64) -> u32 {
        self.words(n / 4)[(n % 4) as usize]
    }

    /// Whether flat element `n = ((b*Hq + h)*L + i)*S + j` is kept.
    #[inline]
    pub fn keeps(&self, n: u64) -> bool {
        if !self.is_active() {
            return true;
        }
        self.word(n) as u64 >= self.keep_threshold()
    }

    /// Fills `keep[j]` for `j` in `0..keep.len()` with the decisions of flat indices
    /// `first .. first + keep.len()`, drawing each Philox block once.
    pub fn fill_keep_row(&self, first: u64, keep: &mut [bool]) {
        if !self.is_active() {
            keep.fill(true);
            return;
        }
        let threshold = self.keep_threshold();
        let mut n = first;
        let mut j = 0;
        while j < keep.len() {
            let words = self.words(n / 4);
            let mut lane = (n % 4) as usize;
            while lane < 4 && j < keep.len() {
                keep[j] = words[lane] as u64 >= threshold;
                lane += 1;
                j += 1;
                n += 1;
            }
        }
    }
}

/// Flat dropout index of `(b, h, i, j)` in `[B, Hq, L, S]`.
///
/// # Panics
/// When the index overflows u64 (never for an element of a validated
/// [`Problem`](crate::Problem)); [`checked_flat_index`] returns `None` instead.
#[inline]
pub fn flat_index(
    b: usize,
    h: usize,
    i: usize,
    j: usize,
    heads_q: usize,
    len_q: usize,
    len_kv: usize,
) -> u64 {
    checked_flat_index(b, h, i, j, heads_q, len_q, len_kv).unwrap_or_else(|| {
        panic!("flat_index: (({b}*{heads_q} + {h})*{len_q} + {i})*{len_kv} + {j} overflows u64")
    })
}

/// Flat dropout index of `(b, h, i, j)` in `[B, Hq, L, S]`, or `None` when it does
/// not fit in a u64.
#[inline]
pub fn checked_flat_index(
    b: usize,
    h: usize,
    i: usize,
    j: usize,
    heads_q: usize,
    len_q: usize,
    len_kv: usize,
) -> Option<u64> {
    let wide = |x: usize| u64::try_from(x).ok();
    wide(b)?
        .checked_mul(wide(heads_q)?)?
        .checked_add(wide(h)?)?
        .checked_mul(wide(len_q)?)?
        .checked_add(wide(i)?)?
        .checked_mul(wide(len_kv)?)?
        .checked_add(wide(j)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from Random123's kat_vectors for philox4x32_10.
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn counter_and_key_word_order() {
        // Seed low word goes to key[0]; counter offset + n/4 fills ctr[0] (low), ctr[1].
        let d = Dropout::new(0.5, 0x299f31d0_a4093822, 0x85a308d3_243f6a88);
        let direct = philox4x32_10([0x243f6a88, 0x85a308d3, 0, 0], [0xa4093822, 0x299f31d0]);
        assert_eq!(d.words(0), direct);
        for lane in 0..4 {
            assert_eq!(d.word(lane), direct[lane as usize]);
        }
        let next = philox4x32_10([0x243f6a89, 0x85a308d3, 0, 0], [0xa4093822, 0x299f31d0]);
        assert_eq!(d.word(5), next[1]);
        // Carry from the low counter word into the high one.
        let d = Dropout::new(0.5, 7, u32::MAX as u64);
        assert_eq!(d.words(1), philox4x32_10([0, 1, 0, 0], [7, 0]));
    }

    #[test]
    fn thresholds() {
        assert_eq!(Dropout::new(0.0, 0, 0).keep_threshold(), 0);
        assert_eq!(Dropout::new(0.5, 0, 0).keep_threshold(), 1 << 31);
        assert_eq!(Dropout::new(0.25, 0, 0).keep_threshold(), 1 << 30);
        assert_eq!(Dropout::new(1.0, 0, 0).keep_threshold(), 1 << 32);
        assert_eq!(
            Dropout::new(1.0 - 1e-12, 0, 0).keep_threshold(),
            u32::MAX as u64
        );
        assert_eq!(Dropout::new(1.0, 0, 0).keep_scale(), 0.0);
        assert_eq!(Dropout::new(0.2, 0, 0).keep_scale(), 1.25);
    }

    #[test]
    fn p_zero_keeps_and_p_one_drops_everything() {
        let keep_all = Dropout::new(0.0, 3, 9);
        let drop_all = Dropout::new(1.0, 3, 9);
        for n in 0..1000 {
            assert!(keep_all.keeps(n));
            assert!(!drop_all.keeps(n));
        }
    }

    #[test]
    fn fill_keep_row_matches_keeps() {
        let d = Dropout::new(0.3, 42, 5);
        for first in [0u64, 1, 2, 3, 6, 101] {
            let mut row = vec![false; 13];
            d.fill_keep_row(first, &mut row);
            for (j, &k) in row.iter().enumerate() {
                assert_eq!(k, d.keeps(first + j as u64), "first {first} j {j}");
            }
        }
    }

    #[test]
    fn validation_and_counters() {
        assert!(Dropout::new(-0.1, 0, 0).validate().is_err());
        assert!(Dropout::new(1.1, 0, 0).validate().is_err());
        assert!(Dropout::new(f64::NAN, 0, 0).validate().is_err());
        assert!(Dropout::new(1.0, 0, 0).validate().is_ok());
        let err = Dropout::new(1.5, 0, 0).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "dropout_p: expected a number in [0, 1], got 1.5"
        );
        assert_eq!(Dropout::counters_used(1, 1, 3, 3), 3);
        assert_eq!(Dropout::counters_used(2, 2, 2, 2), 4);
        assert_eq!(Dropout::new(0.1, 1, 10).advanced(1, 1, 1, 5).offset, 12);
        assert_eq!(flat_index(1, 2, 3, 4, 3, 5, 7), ((3 + 2) * 5 + 3) * 7 + 4);
    }
}
