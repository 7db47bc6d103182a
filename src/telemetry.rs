//! Logging: human-readable in a terminal, JSON for Cloud Logging with
//! `LEASEHOLD_LOG_FORMAT=json`; `RUST_LOG` filters (default `info`).
//!
//! The JSON lines come from `tracing-stackdriver`'s layer, written for Cloud
//! Logging's structured format: `severity`, `message`, `time`,
//! `logging.googleapis.com/sourceLocation`, event fields (their keys
//! camelCased, `labels.*` fields gathered into `logging.googleapis.com/labels`),
//! and the fields of the innermost span under `span` (all spans under
//! `spans`). A task's fields are therefore at `span.task_id`, `span.kind`,
//! `span.executor` and `span.attempt`: filter with
//! `jsonPayload.span.task_id="..."`.
//!
//! Trace correlation: every span gets an OpenTelemetry trace and span id
//! (`tracing-opentelemetry` with an SDK tracer that exports nothing), and once
//! the project is known ([`set_project`], after the configuration is loaded)
//! each line carries `logging.googleapis.com/trace`
//! (`projects/PROJECT/traces/TRACE_ID`) and `logging.googleapis.com/spanId`.
//! [`continue_trace`] makes a task span a child of the producer's span named
//! by the message's W3C `traceparent`, so the producer's trace continues into
//! the task's lines.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Tracer, TracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_stackdriver::CloudTraceConfiguration;
use tracing_subscriber::filter::{FilterFn, Filtered, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer as _, Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The message attribute that carries the producer's W3C `traceparent`: the
/// name the official Pub/Sub clients' OpenTelemetry support publishes
/// (`googclient_` + the propagator's key).
pub const TRACEPARENT_ATTRIBUTE: &str = "googclient_traceparent";

/// The JSON subscriber's handle, kept so [`set_project`] can reach it.
static CLOUD_LOGGING: OnceLock<CloudLogging<fn() -> std::io::Stderr>> = OnceLock::new();

/// Installs the global subscriber once; later calls do nothing. In JSON mode
/// the lines carry no trace until [`set_project`] names the project.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if json {
        let stderr: fn() -> std::io::Stderr = std::io::stderr;
        let (subscriber, handle) = json_subscriber(filter, stderr);
        if subscriber.try_init().is_ok() {
            let _ = CLOUD_LOGGING.set(handle);
        }
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colours only for a person at a terminal, never into log files.
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
}

/// Names the Google Cloud project in the JSON lines' trace field. Called once
/// the configuration is loaded (`telemetry::init` runs before); does nothing
/// in terminal mode, or for an empty project.
pub fn set_project(project: &str) {
    if let Some(logging) = CLOUD_LOGGING.get() {
        logging.set_project(project);
    }
}

/// Makes `span` (a task's span, before it is entered) a child of the
/// producer's span named by a W3C `traceparent`, so the task's lines carry the
/// producer's trace id. `None` leaves the span on its own new trace; an invalid
/// value is logged at debug and ignored.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if !parent.span().span_context().is_valid() {
        span.in_scope(|| {
            tracing::debug!(
                traceparent,
                "ignoring an invalid traceparent attribute; the task starts its own trace"
            );
        });
        return;
    }
    span.set_parent(parent);
}

/// The registry, the level filter and the layer that gives spans their
/// OpenTelemetry ids: what the Cloud Logging layer sits on.
type Base = Layered<SpanIds, Layered<EnvFilter, Registry>>;

/// The layer that gives spans their OpenTelemetry ids (and sees no events).
type SpanIds = Filtered<
    OpenTelemetryLayer<Layered<EnvFilter, Registry>, Tracer>,
    FilterFn<SpanFilter>,
    Layered<EnvFilter, Registry>,
>;

/// A metadata predicate, named so the layer's type can be.
type SpanFilter = fn(&tracing::Metadata<'_>) -> bool;

fn spans_only(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span()
}

/// The Cloud Logging layer writing to `W`.
type Stackdriver<W> = tracing_stackdriver::Layer<Base, W>;

/// What changes the JSON layer once the project is known.
struct CloudLogging<W> {
    /// Swaps the JSON layer for one that writes the trace fields.
    handle: reload::Handle<Stackdriver<W>, Base>,
    /// Where the swapped-in layer writes.
    writer: W,
    /// Owns the span-id generator: the tracer holds only a weak reference, and
    /// without a live provider every id would be zero.
    _provider: TracerProvider,
}

impl<W> CloudLogging<W>
where
    W: for<'a> MakeWriter<'a> + Clone + Send + Sync + 'static,
{
    fn set_project(&self, project: &str) {
        if project.is_empty() {
            return;
        }
        let layer = stackdriver(self.writer.clone()).with_cloud_trace(CloudTraceConfiguration {
            project_id: project.to_string(),
        });
        if let Err(e) = self.handle.reload(layer) {
            tracing::warn!(error = %e, "could not add the trace to the log format");
        }
    }
}

fn stackdriver<W>(writer: W) -> Stackdriver<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    tracing_stackdriver::layer()
        .with_writer(writer)
        .with_source_location(true)
}

/// The JSON subscriber writing to `writer`, and its project handle.
fn json_subscriber<W>(
    filter: EnvFilter,
    writer: W,
) -> (impl Subscriber + Send + Sync + 'static, CloudLogging<W>)
where
    W: for<'a> MakeWriter<'a> + Clone + Send + Sync + 'static,
{
    // No span processor and no exporter: the provider only hands out ids.
    let provider = TracerProvider::builder().build();
    let ids = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("leasehold"))
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        // Spans only: the layer would otherwise keep every event of a span as
        // an OpenTelemetry span event until the span closes, and a task span
        // lives for hours of handler output.
        .with_filter(filter_fn(spans_only as SpanFilter));
    let (json, handle) = reload::Layer::new(stackdriver(writer.clone()));
    let subscriber = Registry::default().with(filter).with(ids).with(json);
    (
        subscriber,
        CloudLogging {
            handle,
            writer,
            _provider: provider,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::LogBuffer;
    use std::sync::Mutex;

    /// The captured lines, one JSON object each.
    fn json_lines(buffer: &LogBuffer) -> Vec<serde_json::Value> {
        buffer
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    const PRODUCER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

    /// Runs `body` under the JSON subscriber (project set when given) and
    /// returns the lines it wrote.
    fn logged(project: Option<&str>, body: impl FnOnce()) -> Vec<serde_json::Value> {
        // One at a time: `set_project` reloads a layer, which rebuilds
        // tracing's global callsite interest cache, and a test running beside
        // that rebuild can see its events dropped.
        static SERIAL: Mutex<()> = Mutex::new(());
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let buffer = LogBuffer::default();
        let (subscriber, logging) = json_subscriber(EnvFilter::new("debug"), buffer.clone());
        if let Some(project) = project {
            logging.set_project(project);
        }
        tracing::subscriber::with_default(subscriber, body);
        json_lines(&buffer)
    }

    fn task_span() -> tracing::Span {
        tracing::info_span!(
            "task",
            task_id = "t-1",
            kind = "job",
            executor = "cpu",
            attempt = 2
        )
    }

    #[test]
    fn a_traceparent_continues_into_the_task_lines() {
        let lines = logged(Some("my-project"), || {
            let span = task_span();
            continue_trace(
                &span,
                Some(&format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01")),
            );
            span.in_scope(|| tracing::info!(stream = "stdout", "hello"));
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["severity"], "INFO");
        assert_eq!(line["message"], "hello");
        assert_eq!(line["stream"], "stdout");
        assert!(line["time"].is_string(), "{line}");
        assert_eq!(
            line["logging.googleapis.com/trace"],
            format!("projects/my-project/traces/{PRODUCER_TRACE}")
        );
        assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
        // The task's own span, a child of the producer's.
        let span_id = line["logging.googleapis.com/spanId"].as_str().unwrap();
        assert_eq!(span_id.len(), 16, "{span_id}");
        assert!(span_id.chars().all(|c| c.is_ascii_hexdigit()), "{span_id}");
        assert_ne!(span_id, PRODUCER_SPAN);
        assert_ne!(span_id, "0000000000000000");
        assert_eq!(
            line["logging.googleapis.com/sourceLocation"]["file"],
            "src/telemetry.rs"
        );
        // The task's fields, where a filter finds them.
        assert_eq!(line["span"]["task_id"], "t-1");
        assert_eq!(line["span"]["kind"], "job");
        assert_eq!(line["span"]["executor"], "cpu");
        assert_eq!(line["span"]["attempt"], 2);
    }

    #[test]
    fn without_a_traceparent_each_task_has_its_own_trace() {
        let lines = logged(Some("my-project"), || {
            for _ in 0..2 {
                let span = task_span();
                continue_trace(&span, None);
                span.in_scope(|| tracing::info!("working"));
            }
        });
        let traces: Vec<&str> = lines
            .iter()
            .map(|l| l["logging.googleapis.com/trace"].as_str().unwrap())
            .collect();
        assert_eq!(traces.len(), 2);
        for t in &traces {
            let id = t.strip_prefix("projects/my-project/traces/").unwrap();
            assert_eq!(id.len(), 32, "{t}");
            assert_ne!(id, "0".repeat(32));
        }
        assert_ne!(traces[0], traces[1]);
    }

    #[test]
    fn an_invalid_traceparent_is_ignored_and_said_at_debug() {
        for bad in [
            "",
            "garbage",
            // All-zero trace id: invalid by the W3C spec.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let lines = logged(Some("my-project"), || {
                let span = task_span();
                continue_trace(&span, Some(bad));
                span.in_scope(|| tracing::info!("working"));
            });
            assert_eq!(lines.len(), 2, "{bad:?}: {lines:?}");
            assert_eq!(lines[0]["severity"], "DEBUG");
            assert_eq!(lines[0]["traceparent"], bad);
            assert_eq!(lines[0]["span"]["task_id"], "t-1", "said about the task");
            let trace = lines[1]["logging.googleapis.com/trace"].as_str().unwrap();
            assert!(trace.starts_with("projects/my-project/traces/"), "{trace}");
            assert!(!trace.ends_with(PRODUCER_TRACE), "{bad:?}: {trace}");
        }
    }

    #[test]
    fn no_trace_field_until_the_project_is_known() {
        let lines = logged(None, || {
            let span = task_span();
            continue_trace(
                &span,
                Some(&format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01")),
            );
            span.in_scope(|| tracing::warn!("early"));
        });
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["severity"], "WARNING");
        assert!(lines[0].get("logging.googleapis.com/trace").is_none());
        assert_eq!(lines[0]["span"]["task_id"], "t-1");
    }

    /// OpenTelemetry span events kept for a span (they would pile up until
    /// it closes).
    fn otel_events(span: &tracing::Span) -> Option<usize> {
        use tracing_subscriber::registry::LookupSpan;
        span.with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<Registry>()?;
            let data = registry.span(id)?;
            let extensions = data.extensions();
            let otel = extensions.get::<tracing_opentelemetry::OtelData>()?;
            Some(otel.builder.events.as_ref().map_or(0, Vec::len))
        })
        .flatten()
    }

    #[test]
    fn a_long_task_span_does_not_hoard_its_lines() {
        let mut kept = None;
        let lines = logged(Some("my-project"), || {
            let span = task_span();
            span.in_scope(|| {
                for i in 0..100 {
                    tracing::info!(stream = "stdout", "line {i}");
                }
            });
            kept = otel_events(&span);
        });
        assert_eq!(lines.len(), 100);
        assert_eq!(kept, Some(0), "the span has ids but keeps no events");
    }

    #[test]
    fn labels_fields_become_cloud_logging_labels() {
        let lines = logged(Some("my-project"), || {
            tracing::info!(labels.executor = "gpu", "started");
        });
        assert_eq!(lines[0]["logging.googleapis.com/labels"]["executor"], "gpu");
    }
}
