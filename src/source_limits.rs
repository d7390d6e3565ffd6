//! Per-source connection limits: how many connections one client address
//! (or one /24, one /64...) may open per second and hold at once.
//!
//! The state is a fixed table of slots indexed by a keyed hash of the
//! masked source address, so its memory does not depend on how many
//! sources there are: an attacker with a whole IPv6 /64 gets no more
//! memory than one client. Sources whose hashes collide share a slot and
//! therefore a budget: they are limited together, never more loosely than
//! configured. The hash key is random per table, so an outsider cannot
//! choose addresses that collide with a victim's.
//!
//! Each slot is 16 bytes of atomics (no lock): the rate is a token bucket
//! kept as one timestamp (GCRA, the "theoretical arrival time"), the
//! concurrency a counter that the connection's guard decrements when it
//! ends.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Slots when `table_size` is not given: 1 MiB per listener.
pub const DEFAULT_TABLE_SIZE: usize = 65_536;

/// A listener's per-source limits, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerSourcePlan {
    /// New connections per second per source; 0 means no rate limit.
    pub rate: u32,
    /// Connections a source may open at once before the rate applies.
    pub burst: u32,
    /// Concurrent connections per source; 0 means no limit.
    pub max_connections: u32,
    /// Sources are IPv4 addresses masked to this prefix length (32: each
    /// address on its own, 24: each /24 together).
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub table_size: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Rate,
    Connections,
}

/// One slot: the rate state and the open connections of the sources that
/// hash to it.
#[derive(Default)]
struct Slot {
    /// Nanoseconds since `epoch()` at which the bucket is full again (0:
    /// never used, full).
    tat_ns: AtomicU64,
    open: AtomicU32,
}

/// The slots and the hash key. Kept across a reload that leaves the
/// table's shape alone, so a reload does not hand every source a fresh
/// budget; guards hold it, so a replaced table lives until its last
/// connection ends.
pub struct SourceTable {
    slots: Box<[Slot]>,
    key: RandomState,
    prefix_v4: u8,
    prefix_v6: u8,
}

impl SourceTable {
    fn new(size: usize, prefix_v4: u8, prefix_v6: u8) -> SourceTable {
        SourceTable {
            slots: (0..size.max(1)).map(|_| Slot::default()).collect(),
            key: RandomState::new(),
            prefix_v4,
            prefix_v6,
        }
    }

    /// Bytes the slots take.
    pub fn memory(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    fn slot_of(&self, ip: IpAddr) -> usize {
        let mut h = self.key.build_hasher();
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) & mask32(self.prefix_v4);
                h.write_u8(4);
                h.write_u32(bits);
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & mask128(self.prefix_v6);
                h.write_u8(6);
                h.write_u128(bits);
            }
        }
        // Multiply-shift maps the 64-bit hash onto the table evenly.
        ((h.finish() as u128 * self.slots.len() as u128) >> 64) as usize
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The limits of one listener: its table and the current parameters.
pub struct SourceLimits {
    table: Arc<SourceTable>,
    /// Nanoseconds between two connections at the sustained rate.
    interval_ns: u64,
    /// How far ahead of now the bucket's timestamp may run: (burst − 1)
    /// intervals.
    tolerance_ns: u64,
    max_connections: u32,
}

impl SourceLimits {
    /// Limits for `plan`, reusing `previous`'s table when its shape (size
    /// and prefixes) is unchanged.
    pub fn new(plan: &PerSourcePlan, previous: Option<&SourceLimits>) -> SourceLimits {
        let table = match previous {
            Some(p)
                if p.table.slots.len() == plan.table_size.max(1)
                    && p.table.prefix_v4 == plan.prefix_v4
                    && p.table.prefix_v6 == plan.prefix_v6 =>
            {
                p.table.clone()
            }
            _ => Arc::new(SourceTable::new(
                plan.table_size,
                plan.prefix_v4,
                plan.prefix_v6,
            )),
        };
        let interval_ns = match plan.rate {
            0 => 0,
            r => 1_000_000_000 / u64::from(r),
        };
        SourceLimits {
            table,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(plan.burst.max(1) - 1)),
            max_connections: plan.max_connections,
        }
    }

    pub fn table(&self) -> &Arc<SourceTable> {
        &self.table
    }

    /// Admit a new connection from `ip`, or say why not. The guard counts
    /// it against its source until dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<SourceGuard, Refusal> {
        let index = self.table.slot_of(ip);
        let slot = &self.table.slots[index];
        // Concurrency first: a connection refused for it does not spend
        // the source's rate budget.
        if self.max_connections > 0 {
            let before = slot.open.fetch_add(1, Ordering::Relaxed);
            if before >= self.max_connections {
                slot.open.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::Connections);
            }
        } else {
            slot.open.fetch_add(1, Ordering::Relaxed);
        }
        if self.interval_ns > 0 && !self.take_token(slot) {
            slot.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Rate);
        }
        Ok(SourceGuard {
            table: self.table.clone(),
            index,
        })
    }

    /// GCRA: allowed while the theoretical arrival time is at most
    /// `tolerance` ahead of now; each connection pushes it one interval.
    fn take_token(&self, slot: &Slot) -> bool {
        let now = now_ns();
        let mut current = slot.tat_ns.load(Ordering::Relaxed);
        loop {
            let tat = current.max(now);
            if tat - now > self.tolerance_ns {
                return false;
            }
            match slot.tat_ns.compare_exchange_weak(
                current,
                tat + self.interval_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Open connections counted in `ip`'s slot (for tests and /status).
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.table.slots[self.table.slot_of(ip)]
            .open
            .load(Ordering::Relaxed)
    }
}

/// Holds one connection's place in its source's count.
pub struct SourceGuard {
    table: Arc<SourceTable>,
    index: usize,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        self.table.slots[self.index]
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn plan(rate: u32, burst: u32, max_connections: u32) -> PerSourcePlan {
        PerSourcePlan {
            rate,
            burst,
            max_connections,
            prefix_v4: 32,
            prefix_v6: 128,
            table_size: 4096,
        }
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn concurrency_is_limited_per_source_and_counts_return_to_zero() {
        let l = SourceLimits::new(&plan(0, 1, 3), None);
        let one = v4(127, 0, 0, 1);
        let guards: Vec<_> = (0..3).map(|_| l.admit(one).unwrap()).collect();
        assert_eq!(l.admit(one).err(), Some(Refusal::Connections));
        assert_eq!(l.open(one), 3, "a refusal leaves the count alone");
        // Another source has its own budget (unless it collides: pick one
        // that does not).
        let other = (2..=255)
            .map(|d| v4(127, 0, 0, d))
            .find(|ip| l.table.slot_of(*ip) != l.table.slot_of(one))
            .unwrap();
        let g = l.admit(other).unwrap();
        drop(guards);
        drop(g);
        assert_eq!(l.open(one), 0);
        assert_eq!(l.open(other), 0);
        assert!(l
            .table
            .slots
            .iter()
            .all(|s| s.open.load(Ordering::Relaxed) == 0));
        assert!(l.admit(one).is_ok());
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills() {
        // 20 per second: one token every 50 ms, a burst of 4.
        let l = SourceLimits::new(&plan(20, 4, 0), None);
        let ip = v4(10, 0, 0, 1);
        for i in 0..4 {
            assert!(l.admit(ip).is_ok(), "connection {i} of the burst");
        }
        assert_eq!(l.admit(ip).err(), Some(Refusal::Rate));
        assert_eq!(l.open(ip), 0, "guards dropped, refusals uncounted");
        std::thread::sleep(Duration::from_millis(120));
        // At least two intervals have passed: two tokens, not the burst.
        assert!(l.admit(ip).is_ok());
        assert!(l.admit(ip).is_ok());
        let mut more = 0;
        while l.admit(ip).is_ok() {
            more += 1;
            assert!(more <= 2, "refilled beyond the burst");
        }
    }

    #[test]
    fn a_connection_refused_for_concurrency_spends_no_rate() {
        let l = SourceLimits::new(&plan(1, 2, 1), None);
        let ip = v4(10, 0, 0, 2);
        let held = l.admit(ip).unwrap();
        for _ in 0..10 {
            assert_eq!(l.admit(ip).err(), Some(Refusal::Connections));
        }
        drop(held);
        assert!(l.admit(ip).is_ok(), "the second token of the burst is left");
    }

    #[test]
    fn prefixes_aggregate_sources() {
        let mut p = plan(0, 1, 2);
        p.prefix_v4 = 24;
        p.prefix_v6 = 64;
        let l = SourceLimits::new(&p, None);
        let _a = l.admit(v4(192, 0, 2, 1)).unwrap();
        let _b = l.admit(v4(192, 0, 2, 200)).unwrap();
        assert_eq!(
            l.admit(v4(192, 0, 2, 77)).err(),
            Some(Refusal::Connections),
            "one /24, one budget"
        );
        let net: u128 = 0x2001_0db8_0000_0001 << 64;
        let _c = l.admit(IpAddr::V6(Ipv6Addr::from(net | 1))).unwrap();
        let _d = l.admit(IpAddr::V6(Ipv6Addr::from(net | 0xffff))).unwrap();
        assert_eq!(
            l.admit(IpAddr::V6(Ipv6Addr::from(net | 0xdead_beef))).err(),
            Some(Refusal::Connections),
            "one /64, one budget"
        );
        // An IPv4-mapped IPv6 peer (a dual-stack socket) is its IPv4 source.
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
        assert_eq!(l.admit(mapped).err(), Some(Refusal::Connections));
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_sources() {
        let mut p = plan(1, 1, 5);
        p.table_size = DEFAULT_TABLE_SIZE;
        let l = SourceLimits::new(&p, None);
        let before = l.table.memory();
        assert_eq!(before, DEFAULT_TABLE_SIZE * 16, "16 bytes a slot");
        // A million distinct IPv6 sources, each holding a connection
        // (when its slot lets it).
        let mut guards = Vec::new();
        let mut refused = 0;
        for i in 0..1_000_000u128 {
            let ip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64) | i));
            match l.admit(ip) {
                Ok(g) => guards.push(g),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(l.table.memory(), before, "the table never grows");
        // Collisions share a budget: at most 5 held per slot in all.
        assert!(guards.len() <= DEFAULT_TABLE_SIZE * 5);
        assert_eq!(guards.len() + refused, 1_000_000);
        drop(guards);
        assert!(l
            .table
            .slots
            .iter()
            .all(|s| s.open.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_reload_keeps_the_table_when_its_shape_stays() {
        let first = SourceLimits::new(&plan(0, 1, 1), None);
        let ip = v4(10, 1, 1, 1);
        let held = first.admit(ip).unwrap();
        let same_shape = SourceLimits::new(&plan(5, 5, 1), Some(&first));
        assert!(Arc::ptr_eq(first.table(), same_shape.table()));
        assert_eq!(same_shape.admit(ip).err(), Some(Refusal::Connections));
        let mut resized = plan(0, 1, 1);
        resized.table_size = 1024;
        let fresh = SourceLimits::new(&resized, Some(&same_shape));
        assert!(!Arc::ptr_eq(first.table(), fresh.table()));
        // The old table's guard still decrements the old table.
        drop(held);
        assert_eq!(first.open(ip), 0);
    }
}
