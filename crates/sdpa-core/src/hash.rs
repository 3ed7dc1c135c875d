//! FNV-1a, 64 bits (Fowler, Noll, Vo): the one non-cryptographic hash of the project —
//! the NVRTC disk-cache key, the golden generator's per-case seeds.
//!
//! Chosen for being a few lines of integer arithmetic with published test vectors, so
//! a key or a seed derived from a name is the same on every machine and in every
//! release. Not for anything an adversary chooses the input of.
//!
//! ```
//! use sdpa_core::hash::{fnv1a, fnv1a_parts};
//!
//! assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
//! // Parts are delimited, so moving a byte between them changes the hash.
//! assert_ne!(fnv1a_parts(&[b"ab", b"c"]), fnv1a_parts(&[b"a", b"bc"]));
//! ```

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

fn absorb(mut h: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    absorb(OFFSET_BASIS, bytes)
}

/// FNV-1a of `parts`, each followed by the byte 0xff. 0xff occurs in no UTF-8 text, so
/// for text parts (sources, option lists, versions) the boundaries count:
/// `["ab", "c"]` and `["a", "bc"]` hash differently.
pub fn fnv1a_parts(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(OFFSET_BASIS, |h, part| absorb(absorb(h, part), &[0xff]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_test_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn parts_end_with_a_delimiter() {
        assert_eq!(fnv1a_parts(&[]), fnv1a(b""));
        assert_eq!(fnv1a_parts(&[b"src", b"opts"]), fnv1a(b"src\xffopts\xff"));
        assert_ne!(fnv1a_parts(&[b"src", b"opts"]), fnv1a_parts(&[b"srcopts"]));
    }
}
