//! Everything that talks to Pub/Sub.
//!
//! - [`connection`]: endpoint and credentials (Google or the emulator), the
//!   factory of every client.
//! - [`data_plane`]: Pull, Acknowledge and `ModifyAckDeadline` behind the
//!   narrow [`DataPlane`] trait (our own tonic stub).
//! - [`publisher`]: what the worker publishes (dead letters, result events),
//!   behind the narrow [`Publisher`] trait (the official publisher).
//! - [`producer`]: publishing tasks (`leasehold publish`, `leasehold dev`).
//! - [`subscriptions`]: what every subscription must look like;
//!   [`admin`]: `leasehold setup` (creates it, fixes drift) and `run`'s check.

mod ack_errors;
pub mod admin;
pub mod connection;
pub mod data_plane;
pub mod producer;
pub mod publisher;
pub mod subscriptions;

pub use connection::{Connection, ConnectionError, Endpoint};
pub use data_plane::{DataPlane, FailedIds, GrpcDataPlane, RpcError};
pub use publisher::{GooglePublisher, Outgoing, PublishFailed, Publisher};

/// The generated data-plane messages, re-exported for fakes and tests.
pub use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{PubsubMessage, ReceivedMessage};
