//! # leasehold
//!
//! A Cloud Pub/Sub pull worker for long-running GPU and CPU batch tasks: it
//! pulls a task only when an executor slot is free, extends the message's
//! lease for as long as the task runs, and hands it to the executor its kind
//! needs.
//!
//! # Layout
//!
//! One message, in the order it meets them:
//!
//! - [`puller`]: `Pull(max_messages = free slots)` per executor; each pulled
//!   message becomes a [`lease::Lease`] and a task in a slot.
//! - [`lease`]: the lease value, the pure lease book, and the loop that
//!   extends, acks and releases in batches.
//! - [`dispatch`]: decode ([`task`]), route to the kind's [`handler`], run in
//!   the [`executor`]'s slot, decide the [`disposition`], end the lease.
//! - [`dead_letter`], [`results`]: what is published about a task;
//!   [`hand_back`]: a task interrupted by shutdown goes back as a copy.
//! - [`worker`]: all of the above per executor, plus the shutdown sequence.
//! - [`pod`]: the worker's own pod annotated busy or idle, so scale-in
//!   takes idle pods first.
//!
//! Around them: [`config`] (layered, validated configuration), [`pubsub`]
//! (connection, data plane, publisher, producer, `setup`), [`health`],
//! [`metrics`], [`telemetry`] and [`http`] (probes, metrics, logs),
//! [`emulator`] and [`dev`] (the local demo), and [`cli`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod dev;
pub mod dispatch;
pub mod disposition;
pub mod emulator;
pub mod executor;
pub mod hand_back;
pub mod handler;
pub mod health;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod pod;
pub mod pubsub;
pub mod puller;
pub mod results;
pub mod task;
pub mod telemetry;
pub mod worker;

#[cfg(test)]
pub(crate) mod testing;
