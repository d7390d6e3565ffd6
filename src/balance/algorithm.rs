//! Pure balancing helpers: the weighted round-robin schedule and the
//! rendezvous hash. No state, no I/O: easy to test on their own.

use std::net::{IpAddr, SocketAddr};

/// Expand weights into one full cycle of nginx's smooth weighted round
/// robin: weights [5,1,1] give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c, so
/// a heavy backend never gets a burst. Computed at plan time; picks then
/// only index into it with an atomic counter (lock-free).
pub fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

/// 64-bit FNV-1a followed by a splitmix64 finaliser: stable across
/// processes and releases, so every balancer maps a device the same way.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn ip_bytes(ip: IpAddr) -> ([u8; 16], usize) {
    let mut buf = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            (buf, 4)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                buf[..4].copy_from_slice(&v4.octets());
                (buf, 4)
            }
            None => {
                buf.copy_from_slice(&v6.octets());
                (buf, 16)
            }
        },
    }
}

fn addr_bytes(addr: SocketAddr) -> ([u8; 18], usize) {
    let (ip, n) = ip_bytes(addr.ip());
    let mut buf = [0u8; 18];
    buf[..n].copy_from_slice(&ip[..n]);
    buf[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    (buf, n + 2)
}

/// Weighted rendezvous (highest random weight) score of `backend` for
/// `client`. The backend with the highest score wins; removing one backend
/// moves only the clients it had (≈1/N), and the rest stay put.
pub fn rendezvous_score(client: IpAddr, backend: SocketAddr, weight: u32) -> f64 {
    let (c, cn) = ip_bytes(client);
    let (b, bn) = addr_bytes(backend);
    let h = hash64(&[&c[..cn], &b[..bn]]);
    // Map to (0, 1): never 0, so ln() is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight as f64) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_schedule_interleaves_by_weight() {
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        let s = smooth_schedule(&[5, 1, 1]);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        let s = smooth_schedule(&[1, 2]);
        assert_eq!(s.iter().filter(|&&i| i == 1).count(), 2);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn rendezvous_moves_about_one_nth() {
        let backends: Vec<SocketAddr> = (0..5)
            .map(|i| format!("10.0.0.{}:80", i + 1).parse().unwrap())
            .collect();
        let pick = |set: &[SocketAddr], ip: IpAddr| {
            *set.iter()
                .max_by(|a, b| {
                    rendezvous_score(ip, **a, 1)
                        .partial_cmp(&rendezvous_score(ip, **b, 1))
                        .unwrap()
                })
                .unwrap()
        };
        let clients: Vec<IpAddr> = (0..10_000u32)
            .map(|i| IpAddr::V4((0x0a00_0000 + i).into()))
            .collect();
        let before: Vec<_> = clients.iter().map(|&c| pick(&backends, c)).collect();
        let fewer = &backends[..4];
        let mut moved = 0;
        for (c, b) in clients.iter().zip(&before) {
            let after = pick(fewer, *c);
            if after != *b {
                moved += 1;
                // Only clients of the removed backend move.
                assert_eq!(*b, backends[4]);
            }
        }
        let share = moved as f64 / clients.len() as f64;
        assert!((0.15..0.25).contains(&share), "moved {share}");
    }
}
