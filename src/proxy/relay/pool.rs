//! Relay buffers, lent only while bytes are in flight.
//!
//! An idle session holds no relay buffer at all: a direction takes a buffer just before it reads
//! and gives it back as soon as the read finds nothing and nothing is waiting to be written. This
//! is what keeps an idle session down to a few KiB. Free buffers are kept per thread (no lock on
//! the hot path); the number of bytes lent out is tracked for the `portcullis_relay_buffer_bytes`
//! gauge, so a slow-consumer test can check that memory stays bounded.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Free buffers kept per thread; beyond this, returned buffers are freed.
const MAX_FREE_PER_THREAD: usize = 64;

static LENT_BYTES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Takes a buffer of exactly `size` bytes.
pub fn take(size: usize) -> Box<[u8]> {
    LENT_BYTES.fetch_add(size, Ordering::Relaxed);
    let reused = FREE.with(|f| {
        let mut f = f.borrow_mut();
        match f.last() {
            Some(b) if b.len() == size => f.pop(),
            _ => None,
        }
    });
    reused.unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

/// Gives a buffer back.
pub fn give(buf: Box<[u8]>) {
    LENT_BYTES.fetch_sub(buf.len(), Ordering::Relaxed);
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < MAX_FREE_PER_THREAD {
            f.push(buf);
        }
    });
}

/// Bytes of relay buffer currently lent to sessions, across the process.
pub fn lent_bytes() -> usize {
    LENT_BYTES.load(Ordering::Relaxed)
}
