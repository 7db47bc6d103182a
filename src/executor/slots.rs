//! Slots: numbered places of an executor, each with its device when the
//! executor pins devices. A running task holds one [`Slot`]; dropping it
//! returns the slot to the pool *before* its permit is released, so the next
//! permit always finds a free slot and a device is never given twice.

use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// The free slots of one executor; as many as the executor's free permits.
#[derive(Debug)]
pub(super) struct SlotPool {
    /// Device of each slot (by index), when the executor pins devices.
    devices: Option<Vec<String>>,
    /// Free slot indices, handed out from the end.
    free: Mutex<Vec<usize>>,
    len: usize,
}

impl SlotPool {
    /// `len` slots; `devices`, when given, has one entry per slot.
    pub(super) fn new(len: usize, devices: Option<Vec<String>>) -> SlotPool {
        debug_assert!(devices.as_ref().is_none_or(|d| d.len() == len));
        SlotPool {
            devices,
            // Reversed so slot 0 (the first device) goes first.
            free: Mutex::new((0..len).rev().collect()),
            len,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn devices(&self) -> Option<&[String]> {
        self.devices.as_deref()
    }
}

/// A running task's share of an executor: its slot number and, on a
/// device-pinning executor, its one device.
#[derive(Debug)]
pub struct Slot {
    index: usize,
    device: Option<String>,
    pool: Arc<SlotPool>,
    /// Released after `Drop::drop` has returned the slot (fields drop last).
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// Takes a free slot for `permit`.
    pub(super) fn take(pool: &Arc<SlotPool>, permit: OwnedSemaphorePermit) -> Slot {
        let index = pool
            .free
            .lock()
            .expect("slot pool lock")
            .pop()
            .expect("a permit always finds a free slot");
        Slot {
            index,
            device: pool.devices.as_ref().map(|d| d[index].clone()),
            pool: pool.clone(),
            _permit: permit,
        }
    }

    /// The slot's number within its executor (a bounded metric label).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The device this task holds, if the executor pins devices.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Environment that pins the handler to its device: CUDA and the NVIDIA
    /// container runtime both accept the UUID.
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
        self.pool
            .free
            .lock()
            .expect("slot pool lock")
            .push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use crate::executor::Executor;

    #[tokio::test]
    async fn plain_slots_carry_no_device_and_free_on_drop() {
        let ex = Executor::new("cpu", "s", 3);
        let s = ex.slot(ex.acquire().await);
        assert_eq!(s.device(), None);
        assert!(s.env().is_empty());
        assert_eq!(ex.free_slots(), 2);
        drop(s);
        assert_eq!(ex.free_slots(), 3);
    }

    #[tokio::test]
    async fn a_device_is_never_given_twice_and_comes_back_on_drop() {
        let ex = Executor::with_devices("gpu", "s", vec!["GPU-a".into(), "GPU-b".into()]);
        assert_eq!(ex.slots(), 2);
        let a = ex.slot(ex.acquire().await);
        let b = ex.slot(ex.try_acquire().unwrap());
        assert_eq!((a.index(), a.device()), (0, Some("GPU-a")));
        assert_eq!((b.index(), b.device()), (1, Some("GPU-b")));
        assert!(ex.try_acquire().is_none(), "two devices, two slots");
        assert_eq!(
            a.env(),
            vec![
                ("CUDA_VISIBLE_DEVICES".to_string(), "GPU-a".to_string()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "GPU-a".to_string())
            ]
        );
        drop(a);
        let c = ex.slot(ex.try_acquire().unwrap());
        assert_eq!(c.device(), Some("GPU-a"));
        assert_ne!(c.device(), b.device());
    }

    #[tokio::test]
    async fn an_unused_permit_frees_its_slot() {
        let ex = Executor::new("cpu", "s", 1);
        let p = ex.acquire().await;
        assert!(ex.try_acquire().is_none());
        drop(p);
        assert!(ex.try_acquire().is_some());
    }
}
