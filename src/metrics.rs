//! Prometheus metrics: the names and labels of DESIGN.md's table. Labels are
//! bounded (subscription, kind, executor, outcome, gRPC code): never a task id.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Task-duration buckets, seconds: from 10 ms to 48 h, so tasks of many hours
/// still land in a bucket and quantiles stay meaningful.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    14_400.0, 28_800.0, 86_400.0, 172_800.0,
];

/// The `outcome` label of `tasks_finished`: how a task's attempt ended.
pub const TASK_OUTCOMES: &[&str] = &[
    "succeeded",
    "retrying",
    "dead_lettered",
    "released",
    "lease_lost",
];

/// The `outcome` label of `task_duration`: how the handler run itself ended.
pub const RUN_OUTCOMES: &[&str] = &["succeeded", "failed"];

/// The `result` label of the lease-extension counters.
pub const EXTENSION_RESULTS: &[&str] = &["success", "failure"];

/// Every metric the worker exports, registered in one registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Messages received by Pull.
    pub messages_pulled: IntCounterVec,
    /// Tasks handed to a handler.
    pub tasks_started: IntCounterVec,
    /// Tasks ended, by outcome.
    pub tasks_finished: IntCounterVec,
    /// Handler run time.
    pub task_duration: HistogramVec,
    /// Publish to start.
    pub task_queue_wait: HistogramVec,
    /// Tasks running now.
    pub tasks_in_progress: IntGaugeVec,
    /// Capacity per executor.
    pub executor_slots: IntGaugeVec,
    /// Messages held under lease now.
    pub leases_held: IntGaugeVec,
    /// Messages extended, by result.
    pub lease_extensions: IntCounterVec,
    /// `ModifyAckDeadline` calls of extension rounds, by result.
    pub lease_extension_rpcs: IntCounterVec,
    /// Leases whose deadline passed before an extension succeeded.
    pub leases_lost: IntCounterVec,
    /// Failed Pull calls, by gRPC code.
    pub pull_errors: IntCounterVec,
    /// The latest progress fraction of the task in each slot (0 when idle):
    /// labelled by slot, never by task, so the series are bounded.
    pub task_progress: GaugeVec,
    /// Always 1, labelled with the version.
    pub build_info: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    /// A fresh registry with every metric (one per worker; tests make many).
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            messages_pulled: counter(
                &r,
                "leasehold_messages_pulled_total",
                "Messages received by Pull.",
                &["subscription"],
            ),
            tasks_started: counter(
                &r,
                "leasehold_tasks_started_total",
                "Tasks handed to their handler.",
                &["kind", "executor"],
            ),
            tasks_finished: counter(
                &r,
                "leasehold_tasks_finished_total",
                "Tasks ended, by outcome.",
                &["kind", "executor", "outcome"],
            ),
            task_duration: histogram(
                &r,
                "leasehold_task_duration_seconds",
                "Time from handler start to its end.",
                &["kind", "executor", "outcome"],
            ),
            task_queue_wait: histogram(
                &r,
                "leasehold_task_queue_wait_seconds",
                "Time from publish to handler start.",
                &["kind", "executor"],
            ),
            tasks_in_progress: gauge(
                &r,
                "leasehold_tasks_in_progress",
                "Tasks running now.",
                &["executor"],
            ),
            executor_slots: gauge(
                &r,
                "leasehold_executor_slots",
                "Tasks an executor can run at once.",
                &["executor"],
            ),
            leases_held: gauge(
                &r,
                "leasehold_leases_held",
                "Messages held under lease now.",
                &["subscription"],
            ),
            lease_extensions: counter(
                &r,
                "leasehold_lease_extensions_total",
                "Messages whose ack deadline an extension round asked to extend.",
                &["subscription", "result"],
            ),
            lease_extension_rpcs: counter(
                &r,
                "leasehold_lease_extension_rpcs_total",
                "ModifyAckDeadline calls made by extension rounds.",
                &["subscription", "result"],
            ),
            leases_lost: counter(
                &r,
                "leasehold_leases_lost_total",
                "Leases whose deadline passed before an extension succeeded.",
                &["subscription"],
            ),
            pull_errors: counter(
                &r,
                "leasehold_pull_errors_total",
                "Failed Pull calls.",
                &["subscription", "code"],
            ),
            task_progress: {
                let g = GaugeVec::new(
                    Opts::new(
                        "leasehold_task_progress_ratio",
                        "Latest progress fraction (0..1) reported by the task in each slot; 0 when the slot is idle.",
                    ),
                    &["executor", "slot"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            build_info: gauge(
                &r,
                "leasehold_build_info",
                "Always 1; the version is in the label.",
                &["version"],
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Creates at 0 every series whose label values are known at start, so
    /// dashboards and `rate()` read 0 rather than "No data" before the first
    /// event. `executors` are (executor, subscription id) pairs; `kinds` are
    /// (kind, executor) pairs; a kind of an executor not in `executors` (not
    /// run by this worker) is skipped. Plain strings, so this does not depend
    /// on the configuration's types. Series already there keep their values.
    pub fn init_known_series(&self, executors: &[(&str, &str)], kinds: &[(&str, &str)]) {
        for &(executor, subscription) in executors {
            // `with_label_values` creates a missing series at 0 and returns
            // an existing one untouched.
            self.tasks_in_progress.with_label_values(&[executor]);
            self.executor_slots.with_label_values(&[executor]);
            self.messages_pulled.with_label_values(&[subscription]);
            self.leases_held.with_label_values(&[subscription]);
            self.leases_lost.with_label_values(&[subscription]);
            for &result in EXTENSION_RESULTS {
                self.lease_extensions
                    .with_label_values(&[subscription, result]);
                self.lease_extension_rpcs
                    .with_label_values(&[subscription, result]);
            }
        }
        for &(kind, executor) in kinds {
            if !executors.iter().any(|&(e, _)| e == executor) {
                continue;
            }
            self.tasks_started.with_label_values(&[kind, executor]);
            self.task_queue_wait.with_label_values(&[kind, executor]);
            for &outcome in TASK_OUTCOMES {
                self.tasks_finished
                    .with_label_values(&[kind, executor, outcome]);
            }
            for &outcome in RUN_OUTCOMES {
                self.task_duration
                    .with_label_values(&[kind, executor, outcome]);
            }
        }
    }

    /// Creates at 0 the progress gauge of each of `executor`'s `slots`.
    pub fn init_slot_series(&self, executor: &str, slots: usize) {
        for slot in 0..slots {
            self.task_progress
                .with_label_values(&[executor, &slot.to_string()])
                .set(0.0);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text encoding is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one sample line of the exposition, if the series is there.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn known_series_start_at_zero() {
        let m = Metrics::new();
        let before = m.encode();
        assert_eq!(
            sample(
                &before,
                r#"leasehold_lease_extensions_total{result="success",subscription="sub-cpu"}"#
            ),
            None,
            "absent until initialised"
        );
        m.init_known_series(
            &[("cpu", "sub-cpu"), ("gpu", "sub-gpu")],
            &[("job", "cpu"), ("render", "gpu")],
        );
        let text = m.encode();
        for (executor, sub) in [("cpu", "sub-cpu"), ("gpu", "sub-gpu")] {
            for series in [
                format!(r#"leasehold_tasks_in_progress{{executor="{executor}"}}"#),
                format!(r#"leasehold_executor_slots{{executor="{executor}"}}"#),
                format!(r#"leasehold_messages_pulled_total{{subscription="{sub}"}}"#),
                format!(r#"leasehold_leases_held{{subscription="{sub}"}}"#),
                format!(r#"leasehold_leases_lost_total{{subscription="{sub}"}}"#),
                format!(
                    r#"leasehold_lease_extensions_total{{result="success",subscription="{sub}"}}"#
                ),
                format!(
                    r#"leasehold_lease_extensions_total{{result="failure",subscription="{sub}"}}"#
                ),
                format!(
                    r#"leasehold_lease_extension_rpcs_total{{result="success",subscription="{sub}"}}"#
                ),
                format!(
                    r#"leasehold_lease_extension_rpcs_total{{result="failure",subscription="{sub}"}}"#
                ),
            ] {
                assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
            }
        }
        for (kind, executor) in [("job", "cpu"), ("render", "gpu")] {
            let started =
                format!(r#"leasehold_tasks_started_total{{executor="{executor}",kind="{kind}"}}"#);
            assert_eq!(sample(&text, &started), Some(0.0), "{started}");
            for outcome in TASK_OUTCOMES {
                let series = format!(
                    r#"leasehold_tasks_finished_total{{executor="{executor}",kind="{kind}",outcome="{outcome}"}}"#
                );
                assert_eq!(sample(&text, &series), Some(0.0), "{series}");
            }
            for outcome in RUN_OUTCOMES {
                let series = format!(
                    r#"leasehold_task_duration_seconds_count{{executor="{executor}",kind="{kind}",outcome="{outcome}"}}"#
                );
                assert_eq!(sample(&text, &series), Some(0.0), "{series}");
            }
            let wait = format!(
                r#"leasehold_task_queue_wait_seconds_count{{executor="{executor}",kind="{kind}"}}"#
            );
            assert_eq!(sample(&text, &wait), Some(0.0), "{wait}");
        }
        // A kind is only crossed with its own executor.
        assert_eq!(
            sample(
                &text,
                r#"leasehold_tasks_started_total{executor="gpu",kind="job"}"#
            ),
            None
        );
    }

    #[test]
    fn each_slot_has_a_progress_series_from_the_start() {
        let m = Metrics::new();
        m.init_slot_series("gpu", 2);
        let text = m.encode();
        for slot in ["0", "1"] {
            let series =
                format!(r#"leasehold_task_progress_ratio{{executor="gpu",slot="{slot}"}}"#);
            assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
        }
        assert_eq!(
            sample(
                &text,
                r#"leasehold_task_progress_ratio{executor="gpu",slot="2"}"#
            ),
            None
        );
    }

    #[test]
    fn kinds_of_executors_this_worker_does_not_run_get_no_series() {
        let m = Metrics::new();
        m.init_known_series(&[("cpu", "sub-cpu")], &[("job", "cpu"), ("render", "gpu")]);
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"leasehold_tasks_started_total{executor="cpu",kind="job"}"#
            ),
            Some(0.0)
        );
        assert!(!text.contains(r#"executor="gpu""#), "{text}");
    }

    #[test]
    fn initialising_keeps_values_already_counted() {
        let m = Metrics::new();
        m.tasks_finished
            .with_label_values(&["job", "cpu", "succeeded"])
            .inc_by(3);
        m.executor_slots.with_label_values(&["cpu"]).set(4);
        m.init_known_series(&[("cpu", "sub")], &[("job", "cpu")]);
        assert_eq!(
            m.tasks_finished
                .with_label_values(&["job", "cpu", "succeeded"])
                .get(),
            3
        );
        assert_eq!(m.executor_slots.with_label_values(&["cpu"]).get(), 4);
    }
}
