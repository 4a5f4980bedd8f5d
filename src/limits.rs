//! Per-client limits that must hold exactly under concurrency and release on every way a
//! connection ends: the count of connections held per client address (IPv6 grouped by prefix).
//!
//! A leaf: it uses nothing of the crate. Checking and counting happen under one lock, so two
//! connections racing for the last slot cannot both get it; the slot is an RAII guard, so it is
//! freed whatever ends the connection (a close, an error, a panic unwinding the task).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Live connections per client address.
#[derive(Debug, Default)]
pub struct PerIp {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's place in its address's count; released when dropped.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    key: IpAddr,
}

impl PerIp {
    /// A slot for a connection from `ip`, unless `max` connections from its address (IPv6:
    /// from its `/v6_prefix`) are held already; `max == 0` means no cap (and no counting).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: u32, v6_prefix: u8) -> Result<Option<IpSlot>, u32> {
        if max == 0 {
            return Ok(None);
        }
        let key = group(ip, v6_prefix);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Some(IpSlot { table: self.clone(), key }))
    }

    /// Connections held from the `n` busiest addresses, most first.
    pub fn top(&self, n: usize) -> Vec<(IpAddr, u32)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(IpAddr, u32)> = counts.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The address connections from `ip` are counted under: itself for IPv4 (and IPv4-mapped
/// IPv6), its `/prefix` network for IPv6.
fn group(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
                IpAddr::V6((bits & mask).into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_frees_on_drop() {
        let t = Arc::new(PerIp::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = t.try_acquire(ip, 2, 64).unwrap();
        let b = t.try_acquire(ip, 2, 64).unwrap();
        assert_eq!(t.try_acquire(ip, 2, 64).unwrap_err(), 2);
        assert!(t.try_acquire("192.0.2.2".parse().unwrap(), 2, 64).is_ok(), "another address has its own count");
        drop(a);
        assert!(t.try_acquire(ip, 2, 64).is_ok());
        drop(b);
        assert!(t.top(10).is_empty(), "released slots leave no entry");
        assert!(t.try_acquire(ip, 0, 64).unwrap().is_none(), "0 is no cap");
    }

    #[test]
    fn ipv6_is_grouped_by_prefix_and_mapped_ipv4_by_address() {
        let t = Arc::new(PerIp::default());
        let _a = t.try_acquire("2001:db8:1:2::1".parse().unwrap(), 1, 64).unwrap();
        assert!(t.try_acquire("2001:db8:1:2:ffff::9".parse().unwrap(), 1, 64).is_err(), "same /64");
        assert!(t.try_acquire("2001:db8:1:3::1".parse().unwrap(), 1, 64).is_ok(), "another /64");
        let _b = t.try_acquire("::ffff:192.0.2.9".parse().unwrap(), 1, 64).unwrap();
        assert!(t.try_acquire("192.0.2.9".parse().unwrap(), 1, 64).is_err(), "mapped IPv4 counts as IPv4");
    }

    #[test]
    fn exact_under_concurrency() {
        let t = Arc::new(PerIp::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let got: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(|| t.try_acquire(ip, 5, 64).ok().flatten())).collect();
            handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
        });
        assert_eq!(got.len(), 5);
    }
}
