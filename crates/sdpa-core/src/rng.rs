//! SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
//! 2014; Vigna's `splitmix64.c`): the one generator of tensor contents in the project —
//! proptest data, benches, the golden generator's inputs.
//!
//! Chosen for being tiny and for depending on nothing but wrapping integer arithmetic,
//! so a seed gives the same stream on every machine and the committed goldens
//! reproduce byte for byte. Not for anything that needs unpredictability.
//!
//! ```
//! use sdpa_core::rng::SplitMix64;
//!
//! let mut rng = SplitMix64(0);
//! assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
//! let u = rng.unit();
//! assert!((0.0..1.0).contains(&u));
//! ```

/// The SplitMix64 state; the tuple field is the seed, then the running state.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`: the top 53 bits, so exactly a multiple of 2^-53.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f64 {
        self.unit() * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_implementation() {
        // splitmix64.c's outputs for seeds 0 and 1234567.
        let mut rng = SplitMix64(0);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            [
                0xe220_a839_7b1d_cdaf,
                0x6e78_9e6a_a1b9_65f4,
                0x06c4_5d18_8009_454f
            ]
        );
        let mut rng = SplitMix64(1_234_567);
        let first: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821,
            ]
        );
    }

    #[test]
    fn unit_and_symmetric_take_the_top_53_bits() {
        let mut a = SplitMix64(7);
        let mut b = a.clone();
        let bits = b.next_u64() >> 11;
        assert_eq!(a.unit(), bits as f64 * 2f64.powi(-53));
        let mut c = SplitMix64(7);
        assert_eq!(c.symmetric(), bits as f64 * 2f64.powi(-52) - 1.0);
    }
}
