//! Prometheus metrics: the names and labels of DESIGN.md's table. Labels are
//! bounded (subscription, kind, executor, outcome, gRPC code): never a task id.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Task-duration buckets, seconds: from 10 ms to 48 h, so tasks of many hours
/// still land in a bucket and quantiles stay meaningful.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    14_400.0, 28_800.0, 86_400.0, 172_800.0,
];

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
