//! Helpers shared by the L4 test files (pump, metrics, reload): a config
//! builder with listener options, a strict metrics lookup, an echo backend
//! and a cheap pseudo-random byte stream.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

/// One listener `front` on `front` over pool `p`; `listener_extra` and
/// `pool_extra` are TOML lines added to those tables. `{admin}` stays for
/// `Balancer::start`.
pub fn config(
    front: SocketAddr,
    backends: &[SocketAddr],
    listener_extra: &str,
    pool_extra: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
pool = "p"
{listener_extra}

[[pool]]
name = "p"
backends = [{}]
{pool_extra}
"#,
        list.join(", ")
    )
}

/// The value of the series `name` whose labels are exactly `labels`, in
/// any order (the exposition sorts label names). `None` when absent, so a
/// misspelt series fails the test instead of reading as 0.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let (series, value) = parse_line(line)?;
            (series.0 == name && series.1 == want).then_some(value)
        })
}

/// Like `sample`, panicking when the series is absent.
pub fn must(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels)
        .unwrap_or_else(|| panic!("series {name}{labels:?} is not in the metrics:\n{text}"))
}

type Series = (String, Vec<(String, String)>);

fn parse_line(line: &str) -> Option<(Series, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &r[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    let (_, q) = chars.next()?;
                    if q != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    labels.sort();
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(((name, labels), value))
}

/// A backend that echoes every byte and passes the client's FIN back
/// (shutdown of its write side) once the client has finished.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl EchoBackend {
    pub fn start() -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        EchoBackend { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Send `msg` and read exactly its echo back.
pub fn echo_round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, msg, "echo came back altered");
    Ok(())
}

/// xorshift64: a non-repeating byte stream at a few GB/s, so large
/// transfers cost little to generate and a misplaced chunk cannot hide.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed | 1)
    }

    /// Fill `buf` (its length a multiple of 8).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Pipes the process holds (descriptors above stdio): splice keeps its
/// pipes in a pool, the copy path never creates one.
pub fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            (fd > 2 && target.to_string_lossy().starts_with("pipe:")).then_some(())
        })
        .count()
}

/// Open descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
