//! Sharding plans: which rows of the sequence each rank holds.
//!
//! A plan splits `0..len` into segments and gives each rank a list of them; a rank's
//! shard of a `[B, H, len, D]` tensor is its segments' rows, concatenated in order.
//! [`Sharding::Zigzag`] is the causal balance of ring attention: `2N` chunks, rank `r`
//! holding chunks `r` and `2N - 1 - r`, so every rank has as many rows early in the
//! sequence (which read few keys under causal masking) as late (which read many).

use crate::Result;
use ndarray::{concatenate, s, Array4, ArrayView4, Axis};
use sdpa_core::SdpaError;

/// A run of rows `start .. start + len` of the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
}

impl Segment {
    /// `start .. start + len`.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

/// How a sequence is cut over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharding {
    /// `N` consecutive pieces, rank `r` holding piece `r`: balanced without causal.
    Contiguous,
    /// `2N` consecutive chunks, rank `r` holding chunks `r` and `2N - 1 - r`: balanced
    /// under causal masking.
    #[default]
    Zigzag,
}

impl std::str::FromStr for Sharding {
    type Err = SdpaError;
    fn from_str(s: &str) -> std::result::Result<Self, SdpaError> {
        match s {
            "contiguous" => Ok(Sharding::Contiguous),
            "zigzag" => Ok(Sharding::Zigzag),
            _ => Err(SdpaError::invalid("sharding", "contiguous or zigzag", s)),
        }
    }
}

/// The most ranks a plan has (NCCL's communicators are far smaller; the bound keeps a
/// plan's lists and the ring's threads finite).
pub const MAX_RANKS: usize = 1 << 16;

/// Which segments of `0..len` each rank holds; every row belongs to exactly one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    len: usize,
    ranks: Vec<Vec<Segment>>,
}

/// `len` cut into `pieces` consecutive pieces whose lengths differ by at most one (the
/// longer first).
fn pieces(len: usize, pieces: usize) -> Vec<Segment> {
    let (base, extra) = (len / pieces, len % pieces);
    let mut start = 0;
    (0..pieces)
        .map(|c| {
            let len = base + usize::from(c < extra);
            let seg = Segment { start, len };
            start += len;
            seg
        })
        .collect()
}

impl Plan {
    /// The plan `sharding` makes of `len` rows over `ranks` ranks. Lengths that do not
    /// divide evenly give pieces one row apart; more pieces than rows give empty ones.
    ///
    /// # Errors
    /// `ranks` of 0 or above [`MAX_RANKS`].
    pub fn new(sharding: Sharding, len: usize, ranks: usize) -> Result<Self> {
        if ranks == 0 || ranks > MAX_RANKS {
            return Err(SdpaError::invalid("ranks", format!("1 to {MAX_RANKS}"), ranks).into());
        }
        let ranks = match sharding {
            Sharding::Contiguous => pieces(len, ranks).into_iter().map(|s| vec![s]).collect(),
            Sharding::Zigzag => {
                let chunks = pieces(len, 2 * ranks);
                (0..ranks)
                    .map(|r| vec![chunks[r], chunks[2 * ranks - 1 - r]])
                    .collect()
            }
        };
        Plan::from_segments(len, ranks)
    }

    /// A plan from explicit segments (uneven shards, any order within a rank). Empty
    /// segments are dropped.
    ///
    /// # Errors
    /// `segments` that do not cover `0..len` exactly once, naming the first row that is
    /// missing or held twice; no rank at all, or more than [`MAX_RANKS`].
    pub fn from_segments(len: usize, ranks: Vec<Vec<Segment>>) -> Result<Self> {
        if ranks.is_empty() || ranks.len() > MAX_RANKS {
            return Err(
                SdpaError::invalid("ranks", format!("1 to {MAX_RANKS}"), ranks.len()).into(),
            );
        }
        let ranks: Vec<Vec<Segment>> = ranks
            .into_iter()
            .map(|segs| segs.into_iter().filter(|s| s.len > 0).collect())
            .collect();
        let mut all: Vec<(Segment, usize)> = ranks
            .iter()
            .enumerate()
            .flat_map(|(r, segs)| segs.iter().map(move |&s| (s, r)))
            .collect();
        all.sort_by_key(|(s, _)| s.start);
        let mut next = 0usize;
        for (seg, rank) in &all {
            let end = seg.start.checked_add(seg.len);
            if seg.start != next || end.is_none_or(|e| e > len) {
                let what = if seg.start > next {
                    format!("row {next} held by no rank")
                } else {
                    format!(
                        "rank {rank}'s segment {}..{} overlapping or past the end",
                        seg.start,
                        seg.start as u128 + seg.len as u128
                    )
                };
                return Err(SdpaError::invalid(
                    "segments",
                    format!("segments covering rows 0..{len} once each"),
                    what,
                )
                .into());
            }
            next = seg.start + seg.len;
        }
        if next != len {
            return Err(SdpaError::invalid(
                "segments",
                format!("segments covering rows 0..{len} once each"),
                format!("row {next} held by no rank"),
            )
            .into());
        }
        Ok(Plan { len, ranks })
    }

    /// Rows of the whole sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the sequence has no row.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Rank `rank`'s segments, in the order its shard holds them (empty past the last
    /// rank).
    pub fn segments(&self, rank: usize) -> &[Segment] {
        self.ranks.get(rank).map_or(&[], Vec::as_slice)
    }

    /// Rows of rank `rank`'s shard.
    pub fn local_len(&self, rank: usize) -> usize {
        self.segments(rank).iter().map(|s| s.len).sum()
    }

    /// Each of rank `rank`'s segments with the rows `local` of its shard that hold it.
    pub fn local_segments(
        &self,
        rank: usize,
    ) -> impl Iterator<Item = (Segment, std::ops::Range<usize>)> + '_ {
        self.segments(rank).iter().scan(0, |at, &seg| {
            let local = *at..*at + seg.len;
            *at += seg.len;
            Some((seg, local))
        })
    }

    /// Rank `rank`'s shard of `x` (rows along axis 2).
    ///
    /// # Errors
    /// `arg` (the tensor's name) with another length than the plan's, or a rank past
    /// the last.
    pub fn shard<T: Clone>(
        &self,
        arg: &'static str,
        x: ArrayView4<'_, T>,
        rank: usize,
    ) -> Result<Array4<T>> {
        self.check_len(arg, x.dim().2)?;
        self.check_rank(rank)?;
        let views: Vec<_> = self
            .segments(rank)
            .iter()
            .map(|seg| x.slice(s![.., .., seg.range(), ..]))
            .collect();
        Ok(if views.is_empty() {
            x.slice(s![.., .., 0..0, ..]).to_owned()
        } else {
            concatenate(Axis(2), &views).expect("slices of one tensor concatenate")
        })
    }

    /// The whole tensor from each rank's shard (rows along axis 2).
    ///
    /// # Errors
    /// `arg` with a number of shards other than the plan's ranks, or a shard whose
    /// length or other dims do not match.
    pub fn gather<T: Clone>(
        &self,
        arg: &'static str,
        shards: &[ArrayView4<'_, T>],
    ) -> Result<Array4<T>> {
        if shards.len() != self.ranks() {
            return Err(SdpaError::invalid(
                arg,
                format!("{} shards (one a rank)", self.ranks()),
                shards.len(),
            )
            .into());
        }
        let (b, h, _, d) = shards[0].dim();
        let mut pieces = Vec::new();
        for (rank, shard) in shards.iter().enumerate() {
            let (sb, sh, sl, sd) = shard.dim();
            if (sb, sh, sd) != (b, h, d) || sl != self.local_len(rank) {
                return Err(SdpaError::invalid(
                    arg,
                    format!(
                        "rank {rank}'s shard of shape [{b}, {h}, {}, {d}]",
                        self.local_len(rank)
                    ),
                    sdpa_core::shape_text(shard.shape()),
                )
                .into());
            }
            for (seg, local) in self.local_segments(rank) {
                pieces.push((seg.start, shard.slice(s![.., .., local, ..])));
            }
        }
        pieces.sort_by_key(|(start, _)| *start);
        let views: Vec<_> = pieces.into_iter().map(|(_, view)| view).collect();
        Ok(if views.is_empty() {
            shards[0].to_owned()
        } else {
            concatenate(Axis(2), &views).expect("shards of one shape concatenate")
        })
    }

    fn check_len(&self, arg: &'static str, len: usize) -> Result<()> {
        if len != self.len {
            return Err(SdpaError::invalid(
                arg,
                format!("{} rows along the sequence (the plan's)", self.len),
                len,
            )
            .into());
        }
        Ok(())
    }

    pub(crate) fn check_rank(&self, rank: usize) -> Result<()> {
        if rank >= self.ranks() {
            return Err(SdpaError::invalid(
                "rank",
                format!("a rank below {} (the plan's ranks)", self.ranks()),
                rank,
            )
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_pairs_early_and_late_chunks_and_covers_uneven_lengths() {
        let plan = Plan::new(Sharding::Zigzag, 8, 2).unwrap();
        assert_eq!(
            plan.segments(0),
            &[Segment { start: 0, len: 2 }, Segment { start: 6, len: 2 }]
        );
        assert_eq!(
            plan.segments(1),
            &[Segment { start: 2, len: 2 }, Segment { start: 4, len: 2 }]
        );
        // 11 rows over 2N = 6 chunks: 2, 2, 2, 2, 2, 1.
        let plan = Plan::new(Sharding::Zigzag, 11, 3).unwrap();
        let lens: Vec<usize> = (0..3).map(|r| plan.local_len(r)).collect();
        assert_eq!(lens, [3, 4, 4]);
        // Fewer rows than chunks: some ranks hold nothing.
        let plan = Plan::new(Sharding::Zigzag, 3, 4).unwrap();
        assert_eq!((0..4).map(|r| plan.local_len(r)).sum::<usize>(), 3);
        assert_eq!(plan.local_len(3), 0);
    }

    #[test]
    fn shard_then_gather_is_the_identity() {
        let x = Array4::from_shape_fn((2, 3, 13, 4), |(b, h, i, d)| {
            (((b * 3 + h) * 13 + i) * 4 + d) as f64
        });
        for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
            for ranks in 1..=8 {
                let plan = Plan::new(sharding, 13, ranks).unwrap();
                let shards: Vec<_> = (0..ranks)
                    .map(|r| plan.shard("x", x.view(), r).unwrap())
                    .collect();
                let views: Vec<_> = shards.iter().map(|s| s.view()).collect();
                assert_eq!(plan.gather("x", &views).unwrap(), x, "{sharding:?} {ranks}");
            }
        }
    }

    #[test]
    fn bad_plans_and_shards_are_refused_by_name() {
        let seg = |start, len| Segment { start, len };
        let gap = Plan::from_segments(5, vec![vec![seg(0, 2)], vec![seg(3, 2)]]).unwrap_err();
        assert!(gap.to_string().contains("row 2 held by no rank"), "{gap}");
        let twice = Plan::from_segments(4, vec![vec![seg(0, 3)], vec![seg(2, 2)]]).unwrap_err();
        assert!(
            twice.to_string().contains("rank 1's segment 2..4"),
            "{twice}"
        );
        let short = Plan::from_segments(4, vec![vec![seg(0, 3)]]).unwrap_err();
        assert!(
            short.to_string().contains("row 3 held by no rank"),
            "{short}"
        );
        let past = Plan::from_segments(4, vec![vec![seg(0, usize::MAX)]]).unwrap_err();
        assert!(past.to_string().contains("past the end"), "{past}");
        assert!(Plan::new(Sharding::Zigzag, 4, 0)
            .unwrap_err()
            .to_string()
            .contains("ranks"));
        let plan = Plan::new(Sharding::Contiguous, 4, 2).unwrap();
        let x = Array4::<f64>::zeros((1, 1, 5, 2));
        let e = plan.shard("key", x.view(), 0).unwrap_err().to_string();
        assert!(e.starts_with("key: expected 4 rows"), "{e}");
        let e = plan
            .shard("key", x.slice(s![.., .., ..4, ..]), 2)
            .unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
        let e = plan.gather("out", &[x.view()]).unwrap_err().to_string();
        assert!(e.contains("2 shards"), "{e}");
    }
}
