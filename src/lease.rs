//! Leases: keeping every held message's ack deadline ahead of the clock for
//! as long as its task runs, past Pub/Sub's 10-minute cap.
//!
//! - [`book`]: the pure, synchronous record of leases (no I/O, no clock of its
//!   own: every method takes `now`).
//! - [`extender`]: the loop around it that owns the timers and sends batched
//!   ModifyAckDeadline and Acknowledge calls through [`crate::pubsub::DataPlane`].

pub mod book;
pub mod extender;

pub use book::{LeaseBook, Round};
pub use extender::{LeaseHandle, LeaseLoop, LeaseLoopOptions};
