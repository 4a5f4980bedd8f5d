//! Byte buffers, lent only while bytes are in flight: the relay's, and the TLS record buffers.
//!
//! An idle session holds no buffer at all: a relay direction takes a buffer just before it
//! reads and gives it back as soon as the read finds nothing and nothing is waiting to be
//! written, and a TLS connection does the same with its record buffers (see
//! [`crate::proxy::tls::conn`]). This is what keeps an idle session down to a few KiB. Free
//! buffers are kept per thread and per size (no lock on the hot path); the number of bytes lent
//! out is tracked for the `portcullis_relay_buffer_bytes` gauge, so tests can check that an idle
//! session holds none and that a slow consumer's memory stays bounded.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Free buffers kept per thread and size; beyond this, returned buffers are freed.
const MAX_FREE_PER_SIZE: usize = 64;
/// Sizes kept per thread (the routes' `buffer_size`s and the TLS record size); buffers of any
/// other size are freed when returned.
const MAX_SIZES: usize = 4;

static LENT_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Free buffers of one size.
type SizeClass = (usize, Vec<Box<[u8]>>);

thread_local! {
    static FREE: RefCell<Vec<SizeClass>> = const { RefCell::new(Vec::new()) };
}

/// Takes a buffer of exactly `size` bytes.
pub fn take(size: usize) -> Box<[u8]> {
    LENT_BYTES.fetch_add(size, Ordering::Relaxed);
    let reused = FREE.with(|f| {
        let mut f = f.borrow_mut();
        f.iter_mut().find(|(s, _)| *s == size).and_then(|(_, list)| list.pop())
    });
    reused.unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

/// Gives a buffer back.
pub fn give(buf: Box<[u8]>) {
    let size = buf.len();
    LENT_BYTES.fetch_sub(size, Ordering::Relaxed);
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        let at = match f.iter().position(|(s, _)| *s == size) {
            Some(at) => at,
            None if f.len() < MAX_SIZES => {
                f.push((size, Vec::new()));
                f.len() - 1
            }
            None => return,
        };
        let list = &mut f[at].1;
        if list.len() < MAX_FREE_PER_SIZE {
            list.push(buf);
        }
    });
}

/// Bytes of buffer currently lent to sessions, across the process.
pub fn lent_bytes() -> usize {
    LENT_BYTES.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_per_size() {
        let a = take(1_000);
        let b = take(2_000);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        give(a);
        give(b);
        let (a, b) = (take(1_000), take(2_000));
        assert_eq!((a.as_ptr(), b.as_ptr()), (pa, pb), "each size gets its own buffer back");
        assert_eq!((a.len(), b.len()), (1_000, 2_000));
        give(a);
        give(b);
    }
}
