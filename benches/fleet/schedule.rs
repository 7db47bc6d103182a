//! What a fleet run's records say, and the ideal it is compared with.
//!
//! Every task appends `start` and `end` lines (task, worker, slot, Unix
//! microseconds); each worker's receipt of a message is a `recv` line (the
//! Python peer writes it from its stream callback; leasehold's comes from its
//! own "task started" log line). From these alone: makespan, waits behind a
//! busy worker, idle slot-seconds while a backlog existed, slot-free →
//! next-start gaps and duplicates. Pure functions, checked on a hand-made
//! schedule by [`self_check`].

use std::collections::{BTreeMap, HashMap};

/// What a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// The worker received the message (from Pub/Sub, into its own hands).
    Recv,
    /// The task's first instruction.
    Start,
    /// The task's last instruction.
    End,
}

/// One line: `WHAT TASK WORKER SLOT MICROS`.
#[derive(Debug, Clone)]
pub struct Record {
    pub what: What,
    pub task: String,
    pub worker: String,
    pub slot: String,
    pub us: i64,
}

impl Record {
    pub fn line(&self) -> String {
        let what = match self.what {
            What::Recv => "recv",
            What::Start => "start",
            What::End => "end",
        };
        format!(
            "{what} {} {} {} {}\n",
            self.task, self.worker, self.slot, self.us
        )
    }
}

/// Parses a records file; a malformed line is a broken harness, so it panics
/// naming the line.
pub fn parse(text: &str) -> Vec<Record> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let what = match f.first().copied() {
                Some("recv") => What::Recv,
                Some("start") => What::Start,
                Some("end") => What::End,
                _ => panic!("malformed record {l:?}"),
            };
            assert_eq!(f.len(), 5, "malformed record {l:?}");
            Record {
                what,
                task: f[1].to_string(),
                worker: f[2].to_string(),
                slot: f[3].to_string(),
                us: f[4].parse().unwrap_or_else(|_| panic!("bad time in {l:?}")),
            }
        })
        .collect()
}

/// One execution of a task.
#[derive(Debug, Clone)]
struct Run {
    worker: String,
    slot: String,
    recv: i64,
    start: i64,
    end: i64,
}

/// The figures of one fleet run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Distinct tasks that ran.
    pub tasks: usize,
    /// Executions beyond the first of a task.
    pub duplicates: usize,
    /// Executions with no `end` record (a harness or worker failure).
    pub unfinished: usize,
    /// Executions with no `recv` record before their start.
    pub missing_receipts: usize,
    /// First publish → last task end.
    pub makespan_s: f64,
    /// Sum of task durations (end − start of each first execution).
    pub work_s: f64,
    /// Lower bound of any schedule on these slots: max(work / slots, longest task).
    pub lower_bound_s: f64,
    /// Which term of the lower bound is the larger.
    pub bound_is_longest: bool,
    /// Longest-processing-time-first list schedule (an achievable schedule).
    pub lpt_s: f64,
    /// List schedule in publish order with no overhead (a perfect dispatcher
    /// if Pub/Sub handed messages out in publish order).
    pub in_order_s: f64,
    /// List schedule in the order the server handed the messages out (first
    /// receipt of each task by any worker), with no overhead: the best a
    /// consumer that cannot see the rest of the backlog can do.
    pub in_delivery_order_s: f64,
    /// Sum over tasks of the time held by a worker whose slots were all busy
    /// while another worker had a free slot.
    pub wait_behind_busy_s: f64,
    /// Tasks with any such wait.
    pub tasks_waited: usize,
    /// Tasks received while every slot of their worker was busy.
    pub received_while_full: usize,
    /// Longest receipt → start.
    pub max_hold_ms: f64,
    /// Slot-seconds with no task running while some task had not started yet.
    pub idle_slot_s: f64,
    /// Slot frees → that slot's next start, while a backlog existed (a slot
    /// that never started another task counts until the backlog ended).
    pub gap_p50_ms: f64,
    pub gap_p99_ms: f64,
    pub gap_max_ms: f64,
    pub gaps: usize,
    /// The part of each gap before the next task was in its worker's hands
    /// (slot frees → receipt; 0 when it was already held): the Pull.
    pub free_to_receipt_p50_ms: f64,
    pub free_to_receipt_p99_ms: f64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Assembles executions: each `start` is paired with the next `end` of the
/// same task on the same worker and slot, and with the latest `recv` of the
/// task on that worker at or before it.
fn runs(records: &[Record]) -> (BTreeMap<String, Vec<Run>>, usize, usize) {
    let mut recvs: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    let mut ends: HashMap<(&str, &str, &str), Vec<i64>> = HashMap::new();
    for r in records {
        match r.what {
            What::Recv => recvs.entry((&r.task, &r.worker)).or_default().push(r.us),
            What::End => ends
                .entry((&r.task, &r.worker, &r.slot))
                .or_default()
                .push(r.us),
            What::Start => {}
        }
    }
    let mut by_task: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    let (mut unfinished, mut missing) = (0, 0);
    for r in records.iter().filter(|r| r.what == What::Start) {
        let end = ends
            .get(&(r.task.as_str(), r.worker.as_str(), r.slot.as_str()))
            .and_then(|e| e.iter().copied().filter(|&e| e >= r.us).min());
        let Some(end) = end else {
            unfinished += 1;
            continue;
        };
        let recv = recvs
            .get(&(r.task.as_str(), r.worker.as_str()))
            .and_then(|v| v.iter().copied().filter(|&t| t <= r.us).max());
        if recv.is_none() {
            missing += 1;
        }
        by_task.entry(r.task.clone()).or_default().push(Run {
            worker: r.worker.clone(),
            slot: r.slot.clone(),
            recv: recv.unwrap_or(r.us),
            start: r.us,
            end,
        });
    }
    for v in by_task.values_mut() {
        v.sort_by_key(|r| r.start);
    }
    (by_task, unfinished, missing)
}

/// The occupancy of every worker between consecutive start/end instants.
struct Timeline {
    /// Segment boundaries, sorted.
    times: Vec<i64>,
    /// Per segment (times\[k\]..times\[k+1\]): running tasks per worker, in `workers` order.
    occupied: Vec<Vec<usize>>,
    workers: Vec<(String, usize)>,
}

impl Timeline {
    fn new(all: &[&Run], workers: &BTreeMap<String, usize>) -> Timeline {
        let workers: Vec<(String, usize)> = workers.iter().map(|(w, s)| (w.clone(), *s)).collect();
        let index: HashMap<&str, usize> = workers
            .iter()
            .enumerate()
            .map(|(i, (w, _))| (w.as_str(), i))
            .collect();
        let mut events: Vec<(i64, usize, i32)> = Vec::new();
        for r in all {
            let w = index[r.worker.as_str()];
            events.push((r.start, w, 1));
            events.push((r.end, w, -1));
        }
        events.sort_unstable();
        let mut times = Vec::new();
        let mut occupied = Vec::new();
        let mut now = vec![0i64; workers.len()];
        let mut i = 0;
        while i < events.len() {
            let t = events[i].0;
            while i < events.len() && events[i].0 == t {
                now[events[i].1] += i64::from(events[i].2);
                i += 1;
            }
            times.push(t);
            occupied.push(now.iter().map(|&n| n.max(0) as usize).collect());
        }
        Timeline {
            times,
            occupied,
            workers,
        }
    }

    /// Integrates `f(segment occupancy)` (in slot units) over `[from, to)`, seconds.
    fn integrate(&self, from: i64, to: i64, f: impl Fn(&[usize]) -> f64) -> f64 {
        if to <= from {
            return 0.0;
        }
        // Before the first event nothing runs.
        let empty = vec![0; self.workers.len()];
        let mut total = 0.0;
        let first = self.times.partition_point(|&t| t <= from);
        let mut t = from;
        let mut current: &[usize] = if first == 0 {
            &empty
        } else {
            &self.occupied[first - 1]
        };
        for k in first..self.times.len() {
            let next = self.times[k].min(to);
            total += (next - t) as f64 * f(current);
            t = next;
            if t >= to {
                break;
            }
            current = &self.occupied[k];
        }
        if t < to {
            total += (to - t) as f64 * f(current);
        }
        total / 1e6
    }
}

/// The figures of a run. `workers` maps each worker to its slots; `t0` is
/// when the backlog's publication began. Task ids sort in publish order.
pub fn analyse(records: &[Record], workers: &BTreeMap<String, usize>, t0: i64) -> Report {
    let (by_task, unfinished, missing_receipts) = runs(records);
    let all: Vec<&Run> = by_task.values().flatten().collect();
    let slots: usize = workers.values().sum();
    let firsts: Vec<&Run> = by_task.values().map(|v| &v[0]).collect();
    let durations: Vec<f64> = firsts
        .iter()
        .map(|r| (r.end - r.start) as f64 / 1e6)
        .collect();
    let work: f64 = durations.iter().sum();
    let longest = durations.iter().copied().fold(0.0, f64::max);
    let makespan = all.iter().map(|r| r.end).max().unwrap_or(t0) - t0;
    // The backlog exists until the last task first started.
    let backlog_end = firsts.iter().map(|r| r.start).max().unwrap_or(t0);
    let timeline = Timeline::new(&all, workers);
    let index: HashMap<&str, usize> = timeline
        .workers
        .iter()
        .enumerate()
        .map(|(i, (w, _))| (w.as_str(), i))
        .collect();
    let caps: Vec<usize> = timeline.workers.iter().map(|(_, s)| *s).collect();

    let mut wait = 0.0;
    let mut tasks_waited = 0;
    let mut received_while_full = 0;
    let mut max_hold: i64 = 0;
    for r in &all {
        let w = index[r.worker.as_str()];
        let caps = &caps;
        // Held by a full worker while another had a free slot. The task's
        // own slot counts as busy only once it started, so `start` ends it.
        let waited = timeline.integrate(r.recv, r.start, |occ| {
            let full = occ[w] >= caps[w];
            let other_free = occ.iter().enumerate().any(|(i, &o)| i != w && o < caps[i]);
            if full && other_free { 1.0 } else { 0.0 }
        });
        if waited > 0.0 {
            tasks_waited += 1;
        }
        wait += waited;
        let at_receipt = timeline.integrate(r.recv, r.recv + 1, |occ| occ[w] as f64) * 1e6;
        if r.recv < r.start && at_receipt.round() as usize >= caps[w] {
            received_while_full += 1;
        }
        max_hold = max_hold.max(r.start - r.recv);
    }
    let idle = timeline.integrate(t0, backlog_end, |occ| {
        (slots - occ.iter().sum::<usize>().min(slots)) as f64
    });

    // Gaps per (worker, slot).
    let mut per_slot: BTreeMap<(&str, &str), Vec<&Run>> = BTreeMap::new();
    for r in &all {
        per_slot.entry((&r.worker, &r.slot)).or_default().push(r);
    }
    let mut gaps: Vec<f64> = Vec::new();
    let mut to_receipt: Vec<f64> = Vec::new();
    for runs in per_slot.values_mut() {
        runs.sort_by_key(|r| r.start);
        for (k, a) in runs.iter().enumerate() {
            if a.end > backlog_end {
                continue;
            }
            let next = runs.get(k + 1).map_or(backlog_end, |b| b.start);
            gaps.push((next - a.end) as f64 / 1e3);
            if let Some(b) = runs.get(k + 1) {
                to_receipt.push((b.recv - a.end).max(0) as f64 / 1e3);
            }
        }
    }
    gaps.sort_by(f64::total_cmp);
    to_receipt.sort_by(f64::total_cmp);

    let mut sorted = durations.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let lpt = list_schedule(&sorted, slots);
    let mut in_publish_order: Vec<(&String, f64)> = by_task
        .iter()
        .map(|(task, v)| (task, (v[0].end - v[0].start) as f64 / 1e6))
        .collect();
    // Task ids are `t00042`: their order is the publish order.
    in_publish_order.sort_by(|a, b| a.0.cmp(b.0));
    let in_order = list_schedule(
        &in_publish_order.iter().map(|x| x.1).collect::<Vec<_>>(),
        slots,
    );
    let mut in_delivery_order: Vec<(i64, f64)> = by_task
        .values()
        .map(|v| {
            let first_receipt = v.iter().map(|r| r.recv).min().unwrap_or(v[0].start);
            (first_receipt, (v[0].end - v[0].start) as f64 / 1e6)
        })
        .collect();
    in_delivery_order.sort_by_key(|x| x.0);
    let in_delivery_order = list_schedule(
        &in_delivery_order.iter().map(|x| x.1).collect::<Vec<_>>(),
        slots,
    );
    let bound_total = work / slots.max(1) as f64;
    Report {
        tasks: by_task.len(),
        duplicates: all.len() - by_task.len(),
        unfinished,
        missing_receipts,
        makespan_s: makespan as f64 / 1e6,
        work_s: work,
        lower_bound_s: bound_total.max(longest),
        bound_is_longest: longest > bound_total,
        lpt_s: lpt,
        in_order_s: in_order,
        in_delivery_order_s: in_delivery_order,
        wait_behind_busy_s: wait,
        tasks_waited,
        received_while_full,
        max_hold_ms: max_hold as f64 / 1e3,
        idle_slot_s: idle,
        gap_p50_ms: percentile(&gaps, 50.0),
        gap_p99_ms: percentile(&gaps, 99.0),
        gap_max_ms: gaps.last().copied().unwrap_or(f64::NAN),
        gaps: gaps.len(),
        free_to_receipt_p50_ms: percentile(&to_receipt, 50.0),
        free_to_receipt_p99_ms: percentile(&to_receipt, 99.0),
    }
}

/// Greedy list scheduling: each task, in the order given, on the machine
/// that frees first. Returns the makespan.
pub fn list_schedule(durations: &[f64], machines: usize) -> f64 {
    let mut free = vec![0.0f64; machines.max(1)];
    for &d in durations {
        let (i, _) = free
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one machine");
        free[i] += d;
    }
    free.into_iter().fold(0.0, f64::max)
}

/// Checks the analysis on a schedule worked out by hand; panics on a wrong figure.
pub fn self_check() {
    // Two one-slot workers, times in ms from 0 (publish). Worker a runs t1
    // (0–100) and holds t2 from 10 until it starts it at 100 while worker b
    // is idle until 50, then runs t3 (50–80) and is idle again.
    let ms = |x: i64| x * 1000;
    let rec = |what, task: &str, worker: &str, at| Record {
        what,
        task: task.into(),
        worker: worker.into(),
        slot: "s0".into(),
        us: ms(at),
    };
    let records = vec![
        rec(What::Recv, "t1", "a", 0),
        rec(What::Start, "t1", "a", 0),
        rec(What::Recv, "t2", "a", 10),
        rec(What::Recv, "t3", "b", 50),
        rec(What::Start, "t3", "b", 50),
        rec(What::End, "t3", "b", 80),
        rec(What::End, "t1", "a", 100),
        rec(What::Start, "t2", "a", 100),
        rec(What::End, "t2", "a", 150),
    ];
    let workers = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 1)]);
    let r = analyse(&records, &workers, 0);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    // t2 waited 10–100 behind busy a; b was free during 10–50 and 80–100: 60 ms.
    assert!(
        close(r.wait_behind_busy_s, 0.060),
        "wait {}",
        r.wait_behind_busy_s
    );
    assert_eq!((r.tasks_waited, r.received_while_full), (1, 1));
    // Backlog until t2 started at 100: b idle 0–50 and 80–100 = 70 ms.
    assert!(close(r.idle_slot_s, 0.070), "idle {}", r.idle_slot_s);
    assert!(close(r.makespan_s, 0.150) && close(r.work_s, 0.180));
    // Lower bound max(180/2, 100) = 100 ms, the longest task.
    assert!(close(r.lower_bound_s, 0.100) && r.bound_is_longest);
    // Delivered t1, t2, t3: t1 on one machine, t2 then t3 on the other.
    assert!(close(r.in_delivery_order_s, 0.100) && close(r.in_order_s, 0.100));
    // Gaps: a frees at 100, next start 100 (0 ms); b frees at 80, no next
    // start before the backlog ended at 100 (20 ms).
    assert_eq!(r.gaps, 2);
    assert!(close(r.gap_p50_ms, 0.0) && close(r.gap_max_ms, 20.0));
    // t2 was already held when a freed its slot.
    assert!(close(r.free_to_receipt_p99_ms, 0.0));
    assert_eq!((r.duplicates, r.unfinished, r.missing_receipts), (0, 0, 0));
    // A second run of t3 is a duplicate.
    let mut again = records.clone();
    again.push(rec(What::Start, "t3", "b", 120));
    again.push(rec(What::End, "t3", "b", 130));
    assert_eq!(analyse(&again, &workers, 0).duplicates, 1);
    assert!(close(list_schedule(&[3.0, 3.0, 2.0, 2.0, 2.0], 2), 7.0));
}
