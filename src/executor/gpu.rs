//! The GPU executor: one slot per device; a task holds one device and its
//! handler sees only that one (`CUDA_VISIBLE_DEVICES`, `NVIDIA_VISIBLE_DEVICES`).

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ExecutorClass;
use crate::executor::{Executor, Slot};

/// `[executors.gpu]`: one task per device.
#[derive(Debug)]
pub struct GpuExecutor {
    subscription: String,
    devices: Vec<String>,
    permits: Arc<Semaphore>,
    /// Free devices, as many as free permits: a permit always finds one.
    free: Arc<Mutex<Vec<String>>>,
}

impl GpuExecutor {
    /// An executor over `devices` (in order of preference) on `subscription`.
    pub fn new(subscription: String, devices: Vec<String>) -> Self {
        // Handed out from the end; reversed so the first device goes first.
        let free = devices.iter().rev().cloned().collect();
        GpuExecutor {
            subscription,
            permits: Arc::new(Semaphore::new(devices.len())),
            devices,
            free: Arc::new(Mutex::new(free)),
        }
    }
}

impl Executor for GpuExecutor {
    fn class(&self) -> ExecutorClass {
        ExecutorClass::Gpu
    }

    fn subscription(&self) -> &str {
        &self.subscription
    }

    fn slots(&self) -> usize {
        self.devices.len()
    }

    fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        let device = self
            .free
            .lock()
            .expect("device pool lock")
            .pop()
            .expect("a permit always has a free device");
        Slot::with_device(permit, device, self.free.clone())
    }

    fn devices(&self) -> Option<Vec<String>> {
        Some(self.devices.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_device_is_never_given_twice_and_comes_back_on_drop() {
        let ex: Arc<dyn Executor> =
            Arc::new(GpuExecutor::new("s".into(), vec!["0".into(), "1".into()]));
        assert_eq!(ex.slots(), 2);
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
}
