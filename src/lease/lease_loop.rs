//! The lease loop of one subscription: owns the timers around the pure
//! [`LeaseBook`], sends everything that changes a held message's deadline
//! (extension rounds, acks, retries' backoffs, releases) in batches, and
//! tells a task when its lease is lost or past `max_lease`.
//!
//! The puller holds a [`LeaseHandle`] and turns each pulled message into a
//! [`Lease`]; the task ends its lease, which sends the command here. When
//! every handle and lease is gone the loop flushes what is pending, waits for
//! its RPCs, and ends: shutdown by dropping senders, as in mini-redis.
//!
//! Order per message: a deadline change (a retry's backoff, a release) is
//! held back while an extension of the same message is in flight, and sent
//! when it answers, so an extension that lands late never undoes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};

use crate::lease::handle::Command;
use crate::lease::sender::{Sender, Sent};
use crate::lease::{Interruption, LeaseBook, LeaseHandle, LeaseLoopOptions, Watch, batch};
use crate::metrics::Metrics;
use crate::pubsub::{DataPlane, RpcError};

/// What a finished RPC reports back to the loop.
enum Done {
    Extended {
        ids: Vec<String>,
        sent_at: Instant,
        result: Result<(), RpcError>,
    },
    Other,
}

/// The loop; see the module docs.
pub struct LeaseLoop {
    sender: Sender,
    options: LeaseLoopOptions,
    metrics: Metrics,
    book: LeaseBook,
    /// What each held lease's task watches.
    watches: HashMap<String, Arc<Watch>>,
    rx: mpsc::UnboundedReceiver<Command>,
    /// Acks to send, with their leases' deadlines (for the RPC deadline).
    pending_acks: Vec<(String, Instant)>,
    /// Deadline changes to send, by their value in seconds.
    pending_modifies: BTreeMap<u32, Vec<(String, Instant)>>,
    /// Deadline changes waiting for an extension of the same id to answer.
    parked: HashMap<String, (u32, Instant)>,
    /// When pending acks and changes must be sent at the latest.
    flush_at: Option<Instant>,
    rpcs: JoinSet<Done>,
}

impl LeaseLoop {
    /// Starts the loop; it ends after every handle is dropped and all is flushed.
    pub fn spawn(
        data_plane: Arc<dyn DataPlane>,
        options: LeaseLoopOptions,
        metrics: Metrics,
    ) -> (LeaseHandle, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = LeaseHandle::new(tx, options.first_deadline);
        let lease_loop = LeaseLoop {
            sender: Sender {
                data_plane,
                subscription: options.subscription.clone(),
                give_up_after: options.give_up_after,
            },
            book: LeaseBook::new(options.extension, options.max_lease),
            options,
            metrics,
            watches: HashMap::new(),
            rx,
            pending_acks: Vec::new(),
            pending_modifies: BTreeMap::new(),
            parked: HashMap::new(),
            flush_at: None,
            rpcs: JoinSet::new(),
        };
        (handle, tokio::spawn(lease_loop.run()))
    }

    async fn run(mut self) {
        loop {
            let round_at = self.book.next_round();
            let lost_at = self.book.next_expiry();
            let flush_at = self.flush_at;
            tokio::select! {
                // Order matters: finished RPCs move deadlines forward, and
                // commands remove ended leases, before a round is decided, so
                // a round never extends what was just acked.
                biased;
                Some(done) = self.rpcs.join_next(), if !self.rpcs.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(done);
                    }
                }
                command = self.rx.recv() => match command {
                    Some(command) => self.apply(command),
                    None => break,
                },
                () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    self.flush();
                }
                () = sleep_until(round_at.unwrap_or_else(Instant::now)), if round_at.is_some() => {
                    self.start_round();
                }
                () = sleep_until(lost_at.unwrap_or_else(Instant::now)), if lost_at.is_some() => {
                    let lost = self.book.take_lost(Instant::now());
                    self.lose(&lost, "its deadline passed before an extension succeeded");
                }
            }
        }
        // Every handle is gone: send what is pending and wait for all RPCs
        // (a parked change is sent once its extension answers).
        self.flush();
        while let Some(done) = self.rpcs.join_next().await {
            if let Ok(done) = done {
                self.finished(done);
            }
            self.flush();
        }
        self.update_held();
    }

    fn apply(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Hold(held) => {
                for (id, watch) in held {
                    self.book.add(id.clone(), now, self.options.first_deadline);
                    self.watches.insert(id, watch);
                }
            }
            Command::Ack(id) => {
                let expires = self.end(&id).map_or(now, |r| r.expires);
                self.pending_acks.push((id, expires));
                self.schedule_flush(now);
            }
            Command::Modify(id, secs) => match self.end(&id) {
                Some(removed) if removed.in_flight => {
                    self.parked.insert(id, (secs, removed.expires));
                }
                removed => {
                    let expires = removed.map_or(now, |r| r.expires);
                    self.pending_modifies
                        .entry(secs)
                        .or_default()
                        .push((id, expires));
                    self.schedule_flush(now);
                }
            },
            Command::Forget(id) => {
                self.end(&id);
            }
        }
        self.update_held();
    }

    /// Takes an ended lease out of the book and forgets its watch.
    fn end(&mut self, id: &str) -> Option<crate::lease::book::Removed> {
        self.watches.remove(id);
        self.book.remove(id)
    }

    fn schedule_flush(&mut self, now: Instant) {
        let full = self.pending_acks.len() >= batch::MAX_IDS
            || self
                .pending_modifies
                .values()
                .any(|v| v.len() >= batch::MAX_IDS);
        if full {
            self.flush();
        } else if self.flush_at.is_none() {
            self.flush_at = Some(now + self.options.ack_flush);
        }
    }

    fn update_held(&self) {
        self.metrics
            .leases_held
            .with_label_values(&[&self.options.label])
            .set(i64::try_from(self.book.len()).unwrap_or(i64::MAX));
    }

    /// Sends pending acks and deadline changes, each retried in the background.
    fn flush(&mut self) {
        self.flush_at = None;
        let acks = std::mem::take(&mut self.pending_acks);
        for (ids, expires) in batches(&acks) {
            let sender = self.sender.clone();
            self.rpcs.spawn(async move {
                let sent = sender.acknowledge(ids, expires).await;
                report(
                    &sender,
                    &sent,
                    "acknowledge",
                    "they will be redelivered and their tasks may run again",
                );
                Done::Other
            });
        }
        for (secs, changes) in std::mem::take(&mut self.pending_modifies) {
            for (ids, expires) in batches(&changes) {
                let sender = self.sender.clone();
                let seconds = i32::try_from(secs).unwrap_or(600);
                self.rpcs.spawn(async move {
                    let sent = sender.modify(ids, seconds, expires).await;
                    report(
                        &sender,
                        &sent,
                        "set the deadline of",
                        "they come back when their current deadline passes",
                    );
                    Done::Other
                });
            }
        }
    }

    fn start_round(&mut self) {
        let now = Instant::now();
        let round = self.book.round(now);
        self.lose(
            &round.lost,
            "its deadline passed before an extension was sent",
        );
        for id in &round.past_max_lease {
            tracing::warn!(subscription = %self.options.label, ack_id = %id,
                max_lease = %humantime::format_duration(self.options.max_lease),
                "lease reached lease.max_lease; stopping its task (the lease is kept until it has stopped)");
            if let Some(watch) = self.watches.get(id) {
                watch.interrupt(Interruption::PastMaxLease);
            }
        }
        let secs = i32::try_from(self.options.extension.as_secs()).unwrap_or(600);
        for ids in batch::batches(&round.due) {
            let expires = ids
                .iter()
                .filter_map(|id| self.book.expires(id))
                .min()
                .unwrap_or(now);
            let sender = self.sender.clone();
            self.rpcs.spawn(async move {
                let result = sender.extend(ids.clone(), secs, expires).await;
                Done::Extended {
                    ids,
                    sent_at: now,
                    result,
                }
            });
        }
    }

    fn finished(&mut self, done: Done) {
        let Done::Extended {
            ids,
            sent_at,
            result,
        } = done
        else {
            return;
        };
        let label = self.options.label.clone();
        let (ok, failed, refused) = match &result {
            Ok(()) => (ids.clone(), Vec::new(), Vec::new()),
            Err(RpcError {
                failed_ids: Some(f),
                ..
            }) => {
                let ok = ids
                    .iter()
                    .filter(|id| !f.transient.contains(id) && !f.permanent.contains(id))
                    .cloned()
                    .collect();
                (ok, f.transient.clone(), f.permanent.clone())
            }
            Err(_) => (Vec::new(), ids.clone(), Vec::new()),
        };
        self.count_extension(&label, &result, ok.len(), failed.len() + refused.len());
        self.book.extended(&ok, sent_at);
        for id in &ok {
            if let (Some(watch), Some(expires)) = (self.watches.get(id), self.book.expires(id)) {
                watch.set_expires(expires);
            }
        }
        if !failed.is_empty() {
            if let Err(e) = &result {
                tracing::warn!(subscription = %label, messages = failed.len(), error = %e,
                    "lease extension failed; retrying before the deadline passes");
            }
            self.book.failed(&failed, Instant::now());
        }
        let refused = self.book.refused(&refused);
        self.lose(
            &refused,
            "Pub/Sub refused its ack id (exactly-once delivery)",
        );
        // Changes parked behind these extensions can go now.
        let now = Instant::now();
        for id in &ids {
            if let Some((secs, expires)) = self.parked.remove(id) {
                self.pending_modifies
                    .entry(secs)
                    .or_default()
                    .push((id.clone(), expires));
                self.schedule_flush(now);
            }
        }
    }

    fn count_extension(
        &self,
        label: &str,
        result: &Result<(), RpcError>,
        ok: usize,
        failed: usize,
    ) {
        let m = &self.metrics;
        let rpc_result = if result.is_ok() { "success" } else { "failure" };
        m.lease_extension_rpcs
            .with_label_values(&[label, rpc_result])
            .inc();
        m.lease_extensions
            .with_label_values(&[label, "success"])
            .inc_by(ok as u64);
        m.lease_extensions
            .with_label_values(&[label, "failure"])
            .inc_by(failed as u64);
    }

    /// Counts and reports newly lost leases, and tells their tasks to stop.
    fn lose(&mut self, ids: &[String], why: &str) {
        if ids.is_empty() {
            return;
        }
        self.metrics
            .leases_lost
            .with_label_values(&[&self.options.label])
            .inc_by(ids.len() as u64);
        for id in ids {
            tracing::error!(subscription = %self.options.label, ack_id = %id,
                "lease lost ({why}): another worker may hold the message now; stopping its task here");
            if let Some(watch) = self.watches.get(id) {
                watch.interrupt(Interruption::Lost);
            }
        }
    }
}

/// Ack ids with their deadlines, cut into requests; each batch with the
/// earliest deadline among its leases.
fn batches(items: &[(String, Instant)]) -> Vec<(Vec<String>, Instant)> {
    let expires: HashMap<&str, Instant> = items.iter().map(|(id, e)| (id.as_str(), *e)).collect();
    let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
    batch::batches(&ids)
        .into_iter()
        .map(|b| {
            let earliest = b
                .iter()
                .filter_map(|id| expires.get(id.as_str()).copied())
                .min()
                .unwrap_or_else(Instant::now);
            (b, earliest)
        })
        .collect()
}

/// Logs what a retried ack or deadline change could not do.
fn report(sender: &Sender, sent: &Sent, what: &str, consequence: &str) {
    if let Some(e) = &sent.error {
        tracing::warn!(subscription = %sender.subscription, messages = sent.failed.len(), error = %e,
            "could not {what} messages; {consequence}");
    }
}

#[cfg(test)]
mod tests;
