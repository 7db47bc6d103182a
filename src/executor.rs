//! Executors: a class's capacity. Each enabled class has its own
//! subscription, its own slots and its own puller, so a busy GPU never blocks
//! CPU work and the reverse.
//!
//! A slot is a semaphore permit, acquired *before* pulling (so a worker never
//! holds a message it cannot start) and moved into the task; on the GPU
//! executor it also carries the one device the task may see.

pub mod gpu;

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::config::{Config, Environment, ExecutorClass};

/// The executor of one class.
#[derive(Debug)]
pub struct Executor {
    /// Which class.
    pub class: ExecutorClass,
    /// Its subscription id.
    pub subscription: String,
    /// Capacity: tasks at once.
    pub slots: usize,
    /// Free slots.
    permits: Arc<Semaphore>,
    /// Free GPU devices (GPU executor only); as many as free permits.
    devices: Option<Arc<Mutex<Vec<String>>>>,
}

/// A failure that keeps the worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// GPU discovery found nothing.
    #[error(transparent)]
    Gpu(#[from] gpu::DiscoveryError),
}

impl Executor {
    /// Builds the executor of `class` (GPU devices are discovered here).
    pub fn new(
        class: ExecutorClass,
        config: &Config,
        env: &Environment,
    ) -> Result<Executor, ExecutorError> {
        let subscription = config.topic_and_subscription(class).1.to_string();
        Ok(match class {
            ExecutorClass::Cpu => {
                let slots = match config.executors.cpu.slots {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => n,
                };
                Executor::with_slots(class, subscription, slots, None)
            }
            ExecutorClass::Gpu => {
                let devices = gpu::resolve(&config.executors.gpu.devices, env)?;
                Executor::with_slots(class, subscription, devices.len(), Some(devices))
            }
        })
    }

    /// An executor with explicit capacity (tests, benchmarks).
    pub fn with_slots(
        class: ExecutorClass,
        subscription: String,
        slots: usize,
        devices: Option<Vec<String>>,
    ) -> Executor {
        // Devices are handed out from the end; reverse so "0" goes first.
        let devices = devices.map(|mut d| {
            d.reverse();
            Arc::new(Mutex::new(d))
        });
        Executor {
            class,
            subscription,
            slots,
            permits: Arc::new(Semaphore::new(slots)),
            devices,
        }
    }

    /// The devices of a GPU executor (in order), none for CPU.
    pub fn devices(&self) -> Option<Vec<String>> {
        self.devices.as_ref().map(|d| {
            let mut list = d.lock().expect("device pool lock").clone();
            list.reverse();
            list
        })
    }

    /// Waits for one free slot's permit.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed")
    }

    /// Another free permit, if one is free now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => None,
        }
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }

    /// Turns a permit into a slot, taking a device on the GPU executor.
    pub fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        let device = self.devices.as_ref().map(|pool| {
            pool.lock()
                .expect("device pool lock")
                .pop()
                .expect("a permit always has a free device")
        });
        Slot {
            device,
            pool: self.devices.clone(),
            _permit: permit,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(devices: &[&str]) -> Executor {
        Executor::with_slots(
            ExecutorClass::Gpu,
            "s".into(),
            devices.len(),
            Some(devices.iter().map(|d| d.to_string()).collect()),
        )
    }

    #[tokio::test]
    async fn a_device_is_never_given_twice_and_comes_back_on_drop() {
        let ex = gpu(&["0", "1"]);
        let a = ex.slot(ex.acquire().await);
        let b = ex.slot(ex.try_acquire().unwrap());
        assert_eq!(a.device(), Some("0"));
        assert_eq!(b.device(), Some("1"));
        assert!(ex.try_acquire().is_none(), "two devices, two slots");
        assert_eq!(
            a.env(),
            vec![
                ("CUDA_VISIBLE_DEVICES".to_string(), "0".to_string()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "0".to_string())
            ]
        );
        drop(a);
        let c = ex.slot(ex.try_acquire().unwrap());
        assert_eq!(c.device(), Some("0"));
        assert_ne!(c.device(), b.device());
    }

    #[tokio::test]
    async fn cpu_slots_carry_no_device() {
        let ex = Executor::with_slots(ExecutorClass::Cpu, "s".into(), 3, None);
        let s = ex.slot(ex.acquire().await);
        assert_eq!(s.device(), None);
        assert!(s.env().is_empty());
        assert_eq!(ex.free_slots(), 2);
        drop(s);
        assert_eq!(ex.free_slots(), 3);
    }
}
