//! Everything that talks to Pub/Sub.
//!
//! - [`connection`]: endpoint and credentials (Google or the emulator).
//! - [`subscriber_stub`]: the data plane (Pull, Acknowledge,
//!   ModifyAckDeadline) behind the narrow [`DataPlane`] trait.
//! - [`admin`]: `leasehold setup`, idempotent topic and subscription creation.
//! - [`publisher`]: publishing tasks (and later results and dead letters).

pub mod admin;
pub mod connection;
pub mod publisher;
pub mod subscriber_stub;

pub use connection::{Connection, ConnectionError, Endpoint};
pub use subscriber_stub::{DataPlane, GrpcDataPlane, RpcError};

/// The generated data-plane messages, re-exported for fakes and tests.
pub use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{PubsubMessage, ReceivedMessage};
