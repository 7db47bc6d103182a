//! The cost of a large fleet, on paper but from the code's own arithmetic:
//! the real `LeaseBook` (when rounds come and what they extend) and
//! `lease::batch` (how ids are cut into requests) are driven through
//! simulated hours of one pod whose slots run back-to-back tasks; the fleet
//! is that pod times the pods. RPCs answer instantly here; the rest is the
//! code's: the first deadline of 10 s, rounds two thirds into the earliest
//! deadline that extend every held lease, batches of 1,000 ids / 500 KiB.

use std::time::Duration;

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{
    AcknowledgeRequest, ModifyAckDeadlineRequest, PullRequest,
};
use leasehold::lease::{LeaseBook, batch};
use prost::Message as _;
use tokio::time::Instant;

/// The long poll of each pull loop (`PULL_TIMEOUT` in `src/worker.rs`).
const PULL_LONG_POLL_S: f64 = 5.0;
/// The deadline the book assumes for a fresh message (`FIRST_DEADLINE`).
const FIRST_DEADLINE: Duration = Duration::from_secs(10);
/// A subscription path of a realistic length.
const SUBSCRIPTION: &str = "projects/acme-render-prod/subscriptions/leasehold-tasks-gpu";

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Cost {
    pub extension_s: u64,
    /// Extension ModifyAckDeadline calls per second, fleet-wide.
    pub modack_per_s: f64,
    /// Their request bytes per second.
    pub modack_bytes_per_s: f64,
    /// Their quota usage (each request counts at least 1 kB), kB/s.
    pub modack_quota_kb_per_s: f64,
    /// Pulls per second while every slot is busy (one per task start).
    pub pull_busy_per_s: f64,
    /// Pulls per second while the subscription is empty (idle long polls).
    pub pull_idle_per_s: f64,
    /// Acknowledge calls per second (one per task end).
    pub ack_per_s: f64,
    /// Request bytes of one Pull and one Acknowledge.
    pub pull_request_bytes: usize,
    pub ack_request_bytes: usize,
    /// Time a kill -9 leaves a running task's message invisible: the
    /// remaining deadline of held leases, sampled every second (after each
    /// lease's first extension).
    pub kill9_min_s: f64,
    pub kill9_mean_s: f64,
    pub kill9_max_s: f64,
}

/// `pods` pods of `slots` slots, each running tasks of `task` back to back
/// (the backlog never empties), `extension` per ModifyAckDeadline, ack ids
/// of `ack_id_bytes`. Simulates `hours` after one hour of warm-up.
pub fn fleet_cost(
    pods: usize,
    slots: usize,
    task: Duration,
    extension: Duration,
    ack_id_bytes: usize,
    hours: u32,
) -> Cost {
    let start = Instant::now();
    let warm = start + Duration::from_secs(3600);
    let end = warm + Duration::from_secs(3600) * hours;
    let mut book = LeaseBook::new(extension, Duration::from_secs(48 * 3600));
    // Slot k's tasks start at k/slots of a task length, back to back.
    let mut next_start: Vec<Instant> = (0..slots)
        .map(|k| start + task.mul_f64(k as f64 / slots as f64))
        .collect();
    let mut running: Vec<Option<(String, Instant)>> = vec![None; slots];
    let mut serial = 0u64;
    let (mut rpcs, mut bytes, mut quota_kb) = (0u64, 0u64, 0u64);
    let mut remaining: Vec<f64> = Vec::new();
    let mut sample_at = warm;
    let id_of = |n: u64| format!("{n:0ack_id_bytes$}");
    loop {
        let round = book.next_round().unwrap_or(end);
        let event = next_start.iter().copied().min().unwrap_or(end);
        let now = round.min(event).min(sample_at);
        if now >= end {
            break;
        }
        if now == sample_at {
            for (id, received) in running.iter().flatten() {
                if now >= *received + FIRST_DEADLINE * 2 / 3 {
                    let expires = book.expires(id).expect("held");
                    remaining.push((expires - now).as_secs_f64());
                }
            }
            sample_at += Duration::from_secs(1);
        } else if now == round {
            let due = book.round(now).due;
            for ids in batch::batches(&due) {
                if now >= warm {
                    let n = ModifyAckDeadlineRequest {
                        subscription: SUBSCRIPTION.into(),
                        ack_ids: ids.clone(),
                        ack_deadline_seconds: i32::try_from(extension.as_secs()).unwrap_or(600),
                    }
                    .encoded_len() as u64;
                    rpcs += 1;
                    bytes += n;
                    quota_kb += n.div_ceil(1000).max(1);
                }
            }
            book.extended(&due, now);
        } else {
            // A slot's task ends and the next starts (its Pull answers at once).
            let k = next_start.iter().position(|&t| t == now).expect("an event");
            if let Some((id, _)) = running[k].take() {
                book.remove(&id);
            }
            serial += 1;
            let id = id_of(serial);
            book.add(id.clone(), now, FIRST_DEADLINE);
            running[k] = Some((id, now));
            next_start[k] = now + task;
        }
    }
    let window = f64::from(hours) * 3600.0;
    let fleet = pods as f64;
    let tasks_per_s = fleet * slots as f64 / task.as_secs_f64();
    let mean = remaining.iter().sum::<f64>() / remaining.len().max(1) as f64;
    Cost {
        extension_s: extension.as_secs(),
        modack_per_s: rpcs as f64 / window * fleet,
        modack_bytes_per_s: bytes as f64 / window * fleet,
        modack_quota_kb_per_s: quota_kb as f64 / window * fleet,
        pull_busy_per_s: tasks_per_s,
        pull_idle_per_s: fleet * leasehold::puller::pull_loops(slots) as f64 / PULL_LONG_POLL_S,
        ack_per_s: tasks_per_s,
        pull_request_bytes: PullRequest {
            subscription: SUBSCRIPTION.into(),
            max_messages: 1,
            ..Default::default()
        }
        .encoded_len(),
        ack_request_bytes: AcknowledgeRequest {
            subscription: SUBSCRIPTION.into(),
            ack_ids: vec![id_of(0)],
        }
        .encoded_len(),
        kill9_min_s: remaining.iter().copied().fold(f64::INFINITY, f64::min),
        kill9_mean_s: mean,
        kill9_max_s: remaining.iter().copied().fold(0.0, f64::max),
    }
}
