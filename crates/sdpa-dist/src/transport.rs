//! How ranks pass blocks around the ring.
//!
//! The ring needs one operation each way: post a message to the next rank
//! (`rank + 1 mod N`) without waiting, and take the previous rank's next message, in the
//! order it was posted. NCCL's grouped `send`/`recv` on a communication stream gives
//! exactly that on GPUs; [`InProcess`] gives it to threads of one process (the CPU ring
//! of the tests, or simulated ranks on one GPU).

use crate::{DistError, Result};
use std::sync::mpsc::{channel, Receiver, Sender};

/// A rank's link to its two ring neighbours, carrying messages of type `M`.
///
/// Posting must not wait for the receiver (the ring posts the block it holds, computes,
/// then receives the next one, so that the transfer hides behind the compute), and
/// messages from one rank arrive in the order it posted them.
///
/// The ring is symmetric: every rank posts the same sequence of message kinds (a K/V
/// shard, then in the backward a dK/dV accumulator), and its `k`-th receive is of the
/// kind of its `k`-th post, sized by the plan for the previous rank's owner. A
/// transport over NCCL can therefore issue each post together with its receive in one
/// `ncclGroupStart`/`End` on the communication stream (a send alone would wait for a
/// receive every rank queues behind its own send) and have `recv_prev` make the compute
/// stream wait for that group's event.
pub trait Transport<M> {
    /// This rank, `0 .. ranks()`.
    fn rank(&self) -> usize;
    /// Ranks in the ring.
    fn ranks(&self) -> usize;
    /// Posts `message` to rank `rank() + 1 mod ranks()`.
    ///
    /// # Errors
    /// The next rank has gone away.
    fn send_next(&mut self, message: M) -> Result<()>;
    /// The previous rank's next message, waiting for it.
    ///
    /// # Errors
    /// The previous rank has gone away (an error there ends its part of the ring).
    fn recv_prev(&mut self) -> Result<M>;
}

/// Ranks as threads of one process, linked by channels: what CI runs the ring on.
#[derive(Debug)]
pub struct InProcess<M> {
    rank: usize,
    ranks: usize,
    to_next: Sender<M>,
    from_prev: Receiver<M>,
}

impl<M: Send> InProcess<M> {
    /// A ring of `ranks` linked ends, one for each rank (element `r` is rank `r`'s).
    /// Hand each to its own thread: a rank that returns drops its end, and its
    /// neighbours' next receive or send then fails instead of waiting for ever.
    pub fn ring(ranks: usize) -> Vec<InProcess<M>> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel()).unzip();
        // Rank r sends on channel r + 1 (the next rank's inbox) and reads channel r.
        let mut senders: Vec<Option<Sender<M>>> = senders.into_iter().map(Some).collect();
        receivers
            .into_iter()
            .enumerate()
            .map(|(rank, from_prev)| InProcess {
                rank,
                ranks,
                to_next: senders[(rank + 1) % ranks]
                    .take()
                    .expect("each inbox has one sender"),
                from_prev,
            })
            .collect()
    }
}

impl<M: Send> Transport<M> for InProcess<M> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn send_next(&mut self, message: M) -> Result<()> {
        self.to_next.send(message).map_err(|_| DistError::HungUp {
            rank: self.rank,
            peer: (self.rank + 1) % self.ranks,
        })
    }

    fn recv_prev(&mut self) -> Result<M> {
        self.from_prev.recv().map_err(|_| DistError::HungUp {
            rank: self.rank,
            peer: (self.rank + self.ranks - 1) % self.ranks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_goes_once_round_the_ring_in_order() {
        let ends = InProcess::<(usize, u32)>::ring(4);
        std::thread::scope(|scope| {
            for mut end in ends {
                scope.spawn(move || {
                    let r = end.rank();
                    end.send_next((r, 0)).unwrap();
                    end.send_next((r, 1)).unwrap();
                    let prev = (r + 3) % 4;
                    assert_eq!(end.recv_prev().unwrap(), (prev, 0));
                    assert_eq!(end.recv_prev().unwrap(), (prev, 1));
                });
            }
        });
        // One rank is its own neighbour.
        let mut alone = InProcess::<u8>::ring(1).pop().unwrap();
        alone.send_next(7).unwrap();
        assert_eq!(alone.recv_prev().unwrap(), 7);
    }

    #[test]
    fn a_rank_that_leaves_is_reported_by_its_neighbours() {
        let mut ends = InProcess::<u8>::ring(3);
        let mut two = ends.pop().unwrap();
        let mut one = ends.pop().unwrap();
        drop(ends); // rank 0 leaves
        let e = one.recv_prev().unwrap_err();
        assert_eq!(e.to_string(), "rank 1: rank 0 hung up");
        assert!(e.is_hang_up());
        let e = two.send_next(1).unwrap_err();
        assert_eq!(e.to_string(), "rank 2: rank 0 hung up");
    }
}
