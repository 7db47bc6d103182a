//! The CPU executor: N interchangeable slots.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ExecutorClass;
use crate::executor::{Executor, Slot};

/// `[executors.cpu]`: `slots` tasks at once.
#[derive(Debug)]
pub struct CpuExecutor {
    subscription: String,
    slots: usize,
    permits: Arc<Semaphore>,
}

impl CpuExecutor {
    /// An executor of `slots` slots on `subscription`.
    pub fn new(subscription: String, slots: usize) -> Self {
        CpuExecutor {
            subscription,
            slots,
            permits: Arc::new(Semaphore::new(slots)),
        }
    }
}

impl Executor for CpuExecutor {
    fn class(&self) -> ExecutorClass {
        ExecutorClass::Cpu
    }

    fn subscription(&self) -> &str {
        &self.subscription
    }

    fn slots(&self) -> usize {
        self.slots
    }

    fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot::plain(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cpu_slots_carry_no_device_and_free_on_drop() {
        let ex: Arc<dyn Executor> = Arc::new(CpuExecutor::new("s".into(), 3));
        let s = ex.slot(ex.acquire().await);
        assert_eq!(s.device(), None);
        assert!(s.env().is_empty());
        assert_eq!(ex.free_slots(), 2);
        drop(s);
        assert_eq!(ex.free_slots(), 3);
    }
}
