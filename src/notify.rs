//! A single-waiter, shard-local wake-up flag.
//!
//! Owns: "something changed, look again" between a producer on the same thread and one waiting
//! task (a pump, a connection). Must not cross threads (it is `!Send` by construction).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes one waiting task. A `notify` before the `wait` is not lost: the flag stays set.
#[derive(Default)]
pub struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Polls the flag, registering `waker` when it is not set. Clears the flag when it was set.
    pub fn poll_notified(&self, waker: &Waker) -> Poll<()> {
        if self.flag.replace(false) {
            return Poll::Ready(());
        }
        let mut slot = self.waker.borrow_mut();
        match &*slot {
            Some(existing) if existing.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
        Poll::Pending
    }

    /// Resolves once `notify` was called since the last wait returned. Cancel-safe: dropping
    /// the future loses nothing (the flag is only cleared when it resolves).
    pub async fn wait(&self) {
        poll_fn(|cx| self.poll_notified(cx.waker())).await
    }
}

/// Lets every other ready task on this executor run once before continuing. Used to let
/// handlers that are already runnable add to the current commit batch before it is cut.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
