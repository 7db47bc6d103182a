//! The lease book of one subscription.

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
    /// When the next extension of it is due (two thirds into its deadline).
    extend_at: Instant,
    /// Whether the lease was already counted as lost.
    lost: bool,
}

/// What one extension round must do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Ack ids to extend by `extension`, sorted (the loop cuts them into RPCs).
    pub due: Vec<String>,
    /// Ack ids dropped from the book because they reached `max_lease`; their
    /// messages will be redelivered.
    pub expired: Vec<String>,
}

/// Every message a subscription's puller holds, and when each must be extended.
///
/// Rounds extend *all* held leases at once, so an extension costs as few
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

    /// Records a message received at `now` with the subscription's `ack_deadline`.
    pub fn add(&mut self, ack_id: String, now: Instant, ack_deadline: Duration) {
        self.leases.insert(
            ack_id,
            Lease {
                received: now,
                expires: now + ack_deadline,
                extend_at: extend_point(now, ack_deadline),
                lost: false,
            },
        );
    }

    /// Forgets a lease (acked, nacked or released). True if it was held.
    pub fn remove(&mut self, ack_id: &str) -> bool {
        self.leases.remove(ack_id).is_some()
    }

    /// Number of held leases.
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

    /// When the next round is due, or `None` when nothing is held.
    pub fn next_round(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.extend_at).min()
    }

    /// When the next held lease expires (for lost-lease detection).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.leases
            .values()
            .filter(|l| !l.lost)
            .map(|l| l.expires)
            .min()
    }

    /// Starts a round at `now`: drops leases past `max_lease` and returns the
    /// rest. Each returned lease is marked as in flight until
    /// [`extended`](Self::extended) or [`failed`](Self::failed) is called.
    pub fn round(&mut self, now: Instant) -> Round {
        let max_lease = self.max_lease;
        let mut expired = Vec::new();
        self.leases.retain(|id, l| {
            let keep = now < l.received + max_lease;
            if !keep {
                expired.push(id.clone());
            }
            keep
        });
        let mut ids: Vec<String> = self.leases.keys().cloned().collect();
        ids.sort_unstable();
        // No new round for these until this one answers.
        let in_flight = now + self.extension;
        for l in self.leases.values_mut() {
            l.extend_at = in_flight;
        }
        expired.sort_unstable();
        Round { due: ids, expired }
    }

    /// The batch sent at `sent_at` succeeded: its leases now run `extension`
    /// from then (not from the answer, which would overstate them).
    pub fn extended(&mut self, ids: &[String], sent_at: Instant) {
        self.failures = 0;
        for id in ids {
            if let Some(l) = self.leases.get_mut(id) {
                l.expires = sent_at + self.extension;
                l.extend_at = extend_point(sent_at, self.extension);
                l.lost = false;
            }
        }
    }

    /// The batch failed at `now`: try these again after a backoff (1 s
    /// doubling to 16 s while failures go on), but while a lease is still
    /// live never later than halfway to its deadline (and not sooner than
    /// 100 ms), so a retry always comes before it lapses.
    pub fn failed(&mut self, ids: &[String], now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let backoff = Duration::from_secs(1 << (self.failures - 1).min(4));
        for id in ids {
            if let Some(l) = self.leases.get_mut(id) {
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

    /// Leases whose deadline passed without an extension, each reported once.
    /// They stay in the book: a later extension or ack may still succeed, but
    /// Pub/Sub may already have redelivered the message.
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
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn book() -> LeaseBook {
        LeaseBook::new(60 * SEC, 3600 * SEC)
    }

    #[test]
    fn first_round_is_due_two_thirds_into_the_ack_deadline() {
        let t0 = Instant::now();
        let mut b = book();
        assert_eq!(b.next_round(), None);
        b.add("a".into(), t0, 10 * SEC);
        b.add("b".into(), t0 + 3 * SEC, 10 * SEC);
        assert_eq!(b.next_round(), Some(t0 + 10 * SEC * 2 / 3));
        assert_eq!(b.next_expiry(), Some(t0 + 10 * SEC));
    }

    #[test]
    fn a_round_extends_every_lease() {
        let t0 = Instant::now();
        let mut b = book();
        for i in 0..6_000 {
            b.add(format!("id-{i:05}"), t0, 10 * SEC);
        }
        b.add("late".into(), t0 + 5 * SEC, 10 * SEC);
        let round = b.round(t0 + 7 * SEC);
        assert_eq!(round.due.len(), 6_001, "the later lease rides along");
        assert!(round.expired.is_empty());
        // While the batch is in flight no new round is due.
        assert_eq!(b.next_round(), Some(t0 + 7 * SEC + 60 * SEC));
    }

    #[test]
    fn extended_leases_run_from_the_send_time() {
        let t0 = Instant::now();
        let mut b = book();
        b.add("a".into(), t0, 10 * SEC);
        let sent = t0 + 7 * SEC;
        let round = b.round(sent);
        b.extended(&round.due, sent);
        assert_eq!(b.next_expiry(), Some(sent + 60 * SEC));
        assert_eq!(b.next_round(), Some(sent + 40 * SEC));
    }

    #[test]
    fn failed_batches_are_retried_soon_and_lost_once_their_deadline_passes() {
        let t0 = Instant::now();
        let mut b = book();
        b.add("a".into(), t0, 10 * SEC);
        let round = b.round(t0 + 7 * SEC);
        b.failed(&round.due, t0 + 8 * SEC);
        assert_eq!(b.next_round(), Some(t0 + 9 * SEC));
        assert!(b.take_lost(t0 + 9 * SEC).is_empty());
        assert_eq!(b.take_lost(t0 + 10 * SEC), vec!["a".to_string()]);
        assert!(b.take_lost(t0 + 11 * SEC).is_empty(), "reported once");
        assert!(b.contains("a"), "a lost lease is still held");
        // A later successful extension makes it a live lease again.
        b.extended(&["a".to_string()], t0 + 12 * SEC);
        assert_eq!(b.take_lost(t0 + 72 * SEC), vec!["a".to_string()]);
    }

    #[test]
    fn retries_back_off_but_come_before_the_deadline() {
        let t0 = Instant::now();
        let mut b = LeaseBook::new(60 * SEC, 3600 * SEC);
        b.add("a".into(), t0, 120 * SEC);
        let ids = vec!["a".to_string()];
        // Far from the deadline: 1 s, 2 s, 4 s, 8 s, 16 s, 16 s.
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            b.failed(&ids, now);
            let next = b.next_round().unwrap();
            gaps.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 16, 16]);
        // 10 s before the deadline: halfway to it at most.
        let late = t0 + 110 * SEC;
        b.failed(&ids, late);
        assert_eq!(b.next_round(), Some(late + 5 * SEC));
        // Close to the deadline: not sooner than 100 ms.
        let near = t0 + 120 * SEC - Duration::from_millis(50);
        b.failed(&ids, near);
        assert_eq!(b.next_round(), Some(near + Duration::from_millis(100)));
        // Past it (lost): the plain backoff.
        let past = t0 + 121 * SEC;
        b.failed(&ids, past);
        assert_eq!(b.next_round(), Some(past + 16 * SEC));
        // A success resets the backoff.
        b.extended(&ids, past);
        b.failed(&ids, past + SEC);
        assert_eq!(b.next_round(), Some(past + 2 * SEC));
    }

    #[test]
    fn leases_past_max_lease_are_dropped_not_extended() {
        let t0 = Instant::now();
        let mut b = LeaseBook::new(60 * SEC, 120 * SEC);
        b.add("old".into(), t0, 10 * SEC);
        b.add("new".into(), t0 + 100 * SEC, 10 * SEC);
        let round = b.round(t0 + 121 * SEC);
        assert_eq!(round.expired, vec!["old".to_string()]);
        assert_eq!(round.due, vec!["new".to_string()]);
        assert!(!b.contains("old"));
    }

    #[test]
    fn removed_leases_are_not_extended() {
        let t0 = Instant::now();
        let mut b = book();
        b.add("a".into(), t0, 10 * SEC);
        b.add("b".into(), t0, 10 * SEC);
        assert!(b.remove("a"));
        assert!(!b.remove("a"));
        let round = b.round(t0 + 7 * SEC);
        assert_eq!(round.due, vec!["b".to_string()]);
        assert_eq!(b.len(), 1);
    }
}
