//! Executors: a class's capacity, behind one small trait. Each enabled class
//! has its own subscription, its own slots and its own puller, so a busy GPU
//! never blocks CPU work and the reverse.
//!
//! A slot is a semaphore permit, acquired *before* pulling (so a worker never
//! holds a message it cannot start) and moved into the task as a [`Slot`]; on
//! the GPU executor the slot also carries the one device the task may see.
//! A new executor class is one more implementation of [`Executor`].

pub mod cpu;
pub mod discovery;
pub mod gpu;

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, Environment, ExecutorClass};

pub use cpu::CpuExecutor;
pub use gpu::GpuExecutor;

/// What the puller and dispatcher need of an executor.
pub trait Executor: Send + Sync + std::fmt::Debug {
    /// Which class it serves.
    fn class(&self) -> ExecutorClass;
    /// Its subscription id.
    fn subscription(&self) -> &str;
    /// Capacity: tasks at once.
    fn slots(&self) -> usize;
    /// The free-slot permits.
    fn permits(&self) -> &Arc<Semaphore>;
    /// Turns a permit into a running task's slot.
    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot;
    /// The devices it pins tasks to, if any (for logs and check-config).
    fn devices(&self) -> Option<Vec<String>> {
        None
    }
}

impl dyn Executor {
    /// Waits for one free slot's permit.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        self.permits()
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed")
    }

    /// Another free permit, if one is free now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.permits().clone().try_acquire_owned().ok()
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.permits().available_permits()
    }
}

/// A failure that keeps the worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// GPU discovery found nothing.
    #[error(transparent)]
    Gpu(#[from] discovery::DiscoveryError),
}

/// Builds the executor of `class` from the configuration (GPU devices are
/// discovered here).
pub fn build(
    class: ExecutorClass,
    config: &Config,
    env: &Environment,
) -> Result<Arc<dyn Executor>, ExecutorError> {
    let subscription = config.topic_and_subscription(class).1.to_string();
    Ok(match class {
        ExecutorClass::Cpu => {
            let slots = match config.executors.cpu.slots {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            Arc::new(CpuExecutor::new(subscription, slots))
        }
        ExecutorClass::Gpu => {
            let devices = discovery::resolve(&config.executors.gpu.devices, env)?;
            Arc::new(GpuExecutor::new(subscription, devices))
        }
    })
}

/// A running task's share of an executor. Dropping it frees the slot (and
/// returns its device first, so the next holder always finds one).
#[derive(Debug)]
pub struct Slot {
    device: Option<String>,
    pool: Option<Arc<Mutex<Vec<String>>>>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// A slot with no device.
    pub fn plain(permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            device: None,
            pool: None,
            _permit: permit,
        }
    }

    /// A slot holding `device`, returned to `pool` on drop.
    pub fn with_device(
        permit: OwnedSemaphorePermit,
        device: String,
        pool: Arc<Mutex<Vec<String>>>,
    ) -> Slot {
        Slot {
            device: Some(device),
            pool: Some(pool),
            _permit: permit,
        }
    }

    /// The GPU device this task holds, if any.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Environment that pins the handler to its device.
    pub fn env(&self) -> Vec<(String, String)> {
        match &self.device {
            Some(d) => vec![
                ("CUDA_VISIBLE_DEVICES".to_string(), d.clone()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), d.clone()),
            ],
            None => Vec::new(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Runs before the permit field is dropped.
        if let (Some(device), Some(pool)) = (self.device.take(), &self.pool) {
            pool.lock().expect("device pool lock").push(device);
        }
    }
}
