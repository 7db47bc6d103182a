//! Executors: one class's capacity. Each enabled `[executors.NAME]` table
//! is one [`Executor`] with its own subscription, slots and pull loops, so a
//! busy GPU never blocks CPU work and the reverse.
//!
//! A class is data (name, subscription, slots, optional devices), not a type:
//! a GPU executor is an executor whose slots each own one device.
//! Capacity is a semaphore permit, acquired *before* pulling (so a worker
//! never holds a message it cannot start) and moved into the task as a
//! [`Slot`] once a message arrived for it.

pub mod discovery;
mod slots;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Environment, ExecutorConfig};

pub use slots::Slot;
use slots::SlotPool;

/// The capacity of one executor class.
#[derive(Debug)]
pub struct Executor {
    /// The class name (`cpu`, `gpu`, ...): metric label and handler routing key.
    name: String,
    /// The subscription its pull loops read.
    subscription: String,
    /// One permit per free slot.
    permits: Arc<Semaphore>,
    /// Which slots (and devices) are free: as many as free permits.
    pool: Arc<SlotPool>,
}

/// A free slot, reserved before pulling; [`Executor::slot`] turns it into the
/// running task's [`Slot`]. Dropping it unused frees the slot again.
#[derive(Debug)]
pub struct Permit(OwnedSemaphorePermit);

/// A failure that keeps the worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// GPU discovery found nothing for an executor that pins devices.
    #[error(
        "executors.{executor}: {source}; set executors.{executor}.devices or disable executors.{executor}"
    )]
    Devices {
        /// The class name.
        executor: String,
        /// What discovery found.
        source: discovery::DiscoveryError,
    },
}

impl Executor {
    /// An executor of `slots` interchangeable slots.
    pub fn new(name: &str, subscription: &str, slots: usize) -> Executor {
        Executor::with_pool(name, subscription, SlotPool::new(slots, None))
    }

    /// An executor with one slot per device, each task pinned to its device.
    pub fn with_devices(name: &str, subscription: &str, devices: Vec<String>) -> Executor {
        Executor::with_pool(
            name,
            subscription,
            SlotPool::new(devices.len(), Some(devices)),
        )
    }

    fn with_pool(name: &str, subscription: &str, pool: SlotPool) -> Executor {
        Executor {
            name: name.to_string(),
            subscription: subscription.to_string(),
            permits: Arc::new(Semaphore::new(pool.len())),
            pool: Arc::new(pool),
        }
    }

    /// Builds the executor of `[executors.NAME]` (GPU devices are discovered here).
    pub fn build(
        name: &str,
        config: &ExecutorConfig,
        env: &Environment,
    ) -> Result<Executor, ExecutorError> {
        Ok(if let Some(devices) = &config.devices {
            let devices =
                discovery::resolve(devices, env).map_err(|source| ExecutorError::Devices {
                    executor: name.to_string(),
                    source,
                })?;
            Executor::with_devices(name, &config.subscription, devices)
        } else {
            let slots = match config.slots {
                0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                n => n,
            };
            Executor::new(name, &config.subscription, slots)
        })
    }

    /// The class name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subscription id its tasks arrive on.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// Capacity: tasks at once.
    pub fn slots(&self) -> usize {
        self.pool.len()
    }

    /// The devices it pins tasks to, if any (logs and `check-config`).
    pub fn devices(&self) -> Option<&[String]> {
        self.pool.devices()
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Permit {
        Permit(
            self.permits
                .clone()
                .acquire_owned()
                .await
                .expect("the slot semaphore is never closed"),
        )
    }

    /// Another free slot, if one is free now.
    pub fn try_acquire(&self) -> Option<Permit> {
        self.permits.clone().try_acquire_owned().ok().map(Permit)
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }

    /// Turns a reserved permit into the running task's slot (and device).
    pub fn slot(&self, permit: Permit) -> Slot {
        Slot::take(&self.pool, permit.0)
    }
}
