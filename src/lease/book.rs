//! The lease book of one subscription: a pure, synchronous record of the
//! held messages and their deadlines. No I/O and no clock of its own: every
//! method takes `now`, so the rules are plain `#[test]`s.
//!
//! A lease is *live* while its deadline is ahead; once the deadline passes
//! without a successful extension, or Pub/Sub refuses its ack id, it is
//! *lost* for good: never extended again, because another worker may already
//! hold the message. Past `max_lease` a live lease is flagged once (its task
//! must stop) but still extended until the task ends it, so the message never
//! lapses under a run that is being stopped.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// One held message.
#[derive(Debug, Clone)]
struct Lease {
    /// When we received it: `max_lease` counts from here.
    received: Instant,
    /// When Pub/Sub will consider it unacknowledged if nothing more is sent.
    expires: Instant,
    /// When the next extension of it is due.
    extend_at: Instant,
    /// An extension of it has been sent and has not answered yet.
    in_flight: bool,
    /// Its deadline passed unextended, or its ack id was refused: terminal.
    lost: bool,
    /// Already reported as past `max_lease`.
    over_max: bool,
}

/// What one extension round must do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Live ack ids to extend by `extension`, sorted.
    pub due: Vec<String>,
    /// Ids found past their deadline: lost, their tasks must stop.
    pub lost: Vec<String>,
    /// Ids that just reached `max_lease`: their tasks must stop (they are
    /// still in `due`).
    pub past_max_lease: Vec<String>,
}

/// A lease taken out of the book by an ack or a deadline change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// An extension of it was in flight: a later deadline change must wait
    /// for its answer, or the extension could land after it and undo it.
    pub in_flight: bool,
    /// Its deadline when removed.
    pub expires: Instant,
}

/// Every message a subscription's puller holds, and when each must be extended.
///
/// Rounds extend *all* live leases at once, so an extension costs as few
/// RPCs as the held ids fit in, however the leases arrived.
#[derive(Debug)]
pub struct LeaseBook {
    extension: Duration,
    max_lease: Duration,
    /// Extension failures in a row (reset by a success): the retry backoff.
    failures: u32,
    leases: HashMap<String, Lease>,
}

/// When to extend a lease that was granted `period` at `at`: with a third of
/// it left, which leaves room for a slow RPC and one retry.
fn extend_point(at: Instant, period: Duration) -> Instant {
    at + period * 2 / 3
}

impl LeaseBook {
    /// An empty book. `extension` is what each `ModifyAckDeadline` asks for.
    pub fn new(extension: Duration, max_lease: Duration) -> Self {
        LeaseBook {
            extension,
            max_lease,
            failures: 0,
            leases: HashMap::new(),
        }
    }

    /// Records a message received at `now` with `ack_deadline` to run.
    pub fn add(&mut self, ack_id: String, now: Instant, ack_deadline: Duration) {
        self.leases.insert(
            ack_id,
            Lease {
                received: now,
                expires: now + ack_deadline,
                extend_at: extend_point(now, ack_deadline),
                in_flight: false,
                lost: false,
                over_max: false,
            },
        );
    }

    /// Forgets a lease (acked, retried, released or abandoned).
    pub fn remove(&mut self, ack_id: &str) -> Option<Removed> {
        self.leases.remove(ack_id).map(|l| Removed {
            in_flight: l.in_flight,
            expires: l.expires,
        })
    }

    /// Number of held leases, lost ones included until their task ends them.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Whether an ack id is held.
    pub fn contains(&self, ack_id: &str) -> bool {
        self.leases.contains_key(ack_id)
    }

    /// A held lease's deadline.
    pub fn expires(&self, ack_id: &str) -> Option<Instant> {
        self.leases.get(ack_id).map(|l| l.expires)
    }

    /// When the next round is due, or `None` when nothing live waits for one.
    pub fn next_round(&self) -> Option<Instant> {
        self.leases
            .values()
            .filter(|l| !l.lost && !l.in_flight)
            .map(|l| l.extend_at)
            .min()
    }

    /// When the next live lease's deadline passes (lost-lease detection).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.leases
            .values()
            .filter(|l| !l.lost)
            .map(|l| l.expires)
            .min()
    }

    /// Starts a round at `now`: leases past their deadline are lost, leases
    /// reaching `max_lease` are flagged, and every live lease not already in
    /// flight is returned to extend (and marked in flight until
    /// [`extended`](Self::extended) or [`failed`](Self::failed)).
    pub fn round(&mut self, now: Instant) -> Round {
        let mut round = Round::default();
        for (id, l) in &mut self.leases {
            if l.lost {
                continue;
            }
            if l.expires <= now {
                l.lost = true;
                round.lost.push(id.clone());
                continue;
            }
            if !l.over_max && now >= l.received + self.max_lease {
                l.over_max = true;
                round.past_max_lease.push(id.clone());
            }
            if !l.in_flight {
                l.in_flight = true;
                round.due.push(id.clone());
            }
        }
        round.due.sort_unstable();
        round.lost.sort_unstable();
        round.past_max_lease.sort_unstable();
        round
    }

    /// The extension of `ids` sent at `sent_at` succeeded: their leases now
    /// run `extension` from then (not from the answer, which would overstate
    /// them). A lost lease stays lost.
    pub fn extended(&mut self, ids: &[String], sent_at: Instant) {
        self.failures = 0;
        for id in ids {
            if let Some(l) = self.leases.get_mut(id) {
                l.in_flight = false;
                if !l.lost {
                    l.expires = sent_at + self.extension;
                    l.extend_at = extend_point(sent_at, self.extension);
                }
            }
        }
    }

    /// The extension of `ids` failed at `now`: try again after a backoff (1 s
    /// doubling to 16 s while failures go on), but never later than halfway
    /// to the deadline (and not sooner than 100 ms), so a retry always comes
    /// before it lapses.
    pub fn failed(&mut self, ids: &[String], now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let backoff = Duration::from_secs(1 << (self.failures - 1).min(4));
        for id in ids {
            if let Some(l) = self.leases.get_mut(id) {
                l.in_flight = false;
                let delay = if l.expires > now {
                    backoff
                        .min((l.expires - now) / 2)
                        .max(Duration::from_millis(100))
                } else {
                    backoff
                };
                l.extend_at = now + delay;
            }
        }
    }

    /// Pub/Sub refused these ids for good (an exactly-once subscription):
    /// they are lost. Returns the ones not already lost.
    pub fn refused(&mut self, ids: &[String]) -> Vec<String> {
        let mut newly = Vec::new();
        for id in ids {
            if let Some(l) = self.leases.get_mut(id) {
                l.in_flight = false;
                if !l.lost {
                    l.lost = true;
                    newly.push(id.clone());
                }
            }
        }
        newly
    }

    /// Live leases whose deadline passed without an extension: now lost,
    /// each reported once. They stay held until their task ends them.
    pub fn take_lost(&mut self, now: Instant) -> Vec<String> {
        let mut lost: Vec<String> = self
            .leases
            .iter_mut()
            .filter(|(_, l)| !l.lost && l.expires <= now)
            .map(|(id, l)| {
                l.lost = true;
                id.clone()
            })
            .collect();
        lost.sort_unstable();
        lost
    }
}

#[cfg(test)]
mod tests;
