//! # leasehold
//!
//! A Cloud Pub/Sub pull worker for long-running GPU and CPU batch tasks: it
//! pulls a task only when an executor slot is free, extends the message's
//! lease for as long as the task runs, and hands it to the executor its kind
//! needs.
//!
//! # Layout
//!
//! - [`config`]: layered, validated configuration.
//! - [`task`]: a task decoded from a message.
//! - [`pubsub`]: connection, data-plane stub, admin (`setup`) and publishing.
//! - [`lease`]: the pure lease book and the loop that extends, acks and releases.
//! - [`puller`]: `Pull(max_messages = free slots)` per executor.
//! - [`executor`]: slots and GPU devices.
//! - [`dispatch`]: routing a task to its handler and deciding its fate.
//! - [`handler`]: exec and builtin handlers.
//! - [`disposition`]: ack, retry with backoff, dead-letter, release.
//! - [`results`]: result events on the results topic.
//! - [`worker`]: all of the above plus the shutdown sequence.
//! - [`metrics`], [`telemetry`], [`http`]: Prometheus metrics, logs, probes.
//! - [`emulator`], [`dev`]: the local Pub/Sub emulator and `leasehold dev`.
//! - [`cli`]: the command line.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod dev;
pub mod dispatch;
pub mod disposition;
pub mod emulator;
pub mod executor;
pub mod handler;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod pubsub;
pub mod puller;
pub mod results;
pub mod task;
pub mod telemetry;
pub mod worker;

#[cfg(test)]
pub(crate) mod testing;
