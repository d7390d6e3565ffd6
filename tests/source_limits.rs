//! Per-source limits (`[listener.per_source]`) through the real binary:
//! concurrent connections and new connections per second per client
//! address, refused at accept and counted.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::{eventually, free_addr, Balancer, HoldingBackend};

fn config(front: SocketAddr, backend: SocketAddr, per_source: &str) -> String {
    format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
pool = "p"

[listener.per_source]
{per_source}

[[pool]]
name = "p"
backends = [{{ address = "{backend}" }}]
"#
    )
}

/// What became of a connection from `ip`.
enum Outcome {
    /// The backend's line arrived: proxied, and held open.
    Served(TcpStream),
    /// Closed by the balancer before any byte.
    Refused,
}

fn open_from(front: SocketAddr, ip: &str) -> Outcome {
    let ip: IpAddr = ip.parse().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    sock.connect_timeout(&front.into(), Duration::from_secs(3))
        .expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = [0u8; 5];
    match s.read(&mut line) {
        Ok(n) if n > 0 => {
            assert_eq!(&line[..n], &b"held\n"[..n]);
            Outcome::Served(s)
        }
        Ok(_) => Outcome::Refused,
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset) => Outcome::Refused,
        Err(e) => panic!("neither served nor refused within 5 s: {e}"),
    }
}

fn served(front: SocketAddr, ip: &str) -> TcpStream {
    match open_from(front, ip) {
        Outcome::Served(s) => s,
        Outcome::Refused => panic!("a connection from {ip} was refused"),
    }
}

fn refused(front: SocketAddr, ip: &str) -> bool {
    matches!(open_from(front, ip), Outcome::Refused)
}

fn rejected(fg: &Balancer, reason: &str) -> f64 {
    fg.metric(&format!(
        "fleetgate_connections_rejected_total{{listener=\"front\",reason=\"{reason}\"}}"
    ))
}

#[test]
fn concurrent_connections_are_limited_per_source() {
    let backend = HoldingBackend::start("held");
    let front = free_addr();
    let fg = Balancer::start(&config(front, backend.addr, "max_connections = 3"));

    let mut held: Vec<TcpStream> = (0..3).map(|_| served(front, "127.0.0.1")).collect();
    assert!(
        refused(front, "127.0.0.1"),
        "a 4th connection from 127.0.0.1"
    );
    assert_eq!(rejected(&fg, "source_connections"), 1.0);
    let other = served(front, "127.0.0.2");

    // Closing one frees its place once the balancer sees it end.
    drop(held.pop());
    let mut again = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            if let Outcome::Served(s) = open_from(front, "127.0.0.1") {
                again = Some(s);
            }
            again.is_some()
        }),
        "no place freed after a connection closed"
    );
    // Back at three from 127.0.0.1: the limit holds again.
    assert!(refused(front, "127.0.0.1"));
    assert_eq!(
        fg.metric("fleetgate_connections_active{listener=\"front\"}"),
        4.0
    );

    // Everything closes: every place comes back.
    drop((held, other, again));
    assert!(
        eventually(Duration::from_secs(5), || fg
            .metric("fleetgate_connections_active{listener=\"front\"}")
            == 0.0),
        "connections still counted"
    );
    let back: Vec<TcpStream> = (0..3).map(|_| served(front, "127.0.0.1")).collect();
    assert_eq!(back.len(), 3);
    assert_eq!(rejected(&fg, "source_rate"), 0.0);
}

#[test]
fn new_connections_are_rate_limited_per_source() {
    let backend = HoldingBackend::start("held");
    let front = free_addr();
    // One new connection a second after a burst of three.
    let fg = Balancer::start(&config(front, backend.addr, "rate = 1\nburst = 3"));

    for _ in 0..3 {
        drop(served(front, "127.0.0.3"));
    }
    assert!(refused(front, "127.0.0.3"), "a 4th connection in the burst");
    assert!(rejected(&fg, "source_rate") >= 1.0);
    // Another source has its own bucket.
    drop(served(front, "127.0.0.4"));
    // The bucket refills: within a few seconds 127.0.0.3 is served again.
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            open_from(front, "127.0.0.3"),
            Outcome::Served(_)
        )),
        "the rate never let 127.0.0.3 in again"
    );
    assert_eq!(rejected(&fg, "source_connections"), 0.0);
}

#[test]
fn a_reload_keeps_the_counts() {
    let backend = HoldingBackend::start("held");
    let front = free_addr();
    let fg = Balancer::start(&config(front, backend.addr, "max_connections = 2"));
    let held: Vec<TcpStream> = (0..2).map(|_| served(front, "127.0.0.5")).collect();
    // Same table shape, a different limit: the two held connections count.
    fg.write_config(&config(front, backend.addr, "max_connections = 3"));
    fg.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || fg
            .metric("fleetgate_config_reloads_total{result=\"ok\"}")
            == 1.0),
        "reload not applied"
    );
    let third = served(front, "127.0.0.5");
    assert!(
        refused(front, "127.0.0.5"),
        "the reload forgot the held connections"
    );
    drop((held, third));
}

/// `fleetgate check` names the file, the line and the key of a bad
/// per-source setting.
#[test]
fn check_points_at_bad_per_source_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "max_connections = 1\nprefix_v4 = 33",
            "listener[0].per_source.prefix_v4",
            "prefix_v4 must be 1 to 32",
        ),
        (
            "max_connections = 1\nburst = 5",
            "listener[0].per_source.burst",
            "set `rate` too",
        ),
        (
            "rate = 5\ntable_size = 10",
            "listener[0].per_source.table_size",
            "table_size must be",
        ),
        ("prefix_v6 = 64", "listener[0].per_source", "sets no limit"),
    ];
    for (body, key, says) in cases {
        let text = config(free_addr(), free_addr(), body).replace("{admin}", "127.0.0.1:1");
        let path = common::write(dir.path(), "fleetgate.toml", &text);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {stderr}");
        let line = text
            .lines()
            .position(|l| {
                let k = key.rsplit('.').next().unwrap();
                l.starts_with(&format!("{k} ")) || l == format!("[listener.{k}]")
            })
            .unwrap()
            + 1;
        let want = format!("{}:{line}:", path.display());
        assert!(
            stderr.contains(&want)
                && stderr.contains(&format!("key `{key}`"))
                && stderr.contains(says),
            "{body}: want {want} key `{key}` ... {says}; got {stderr}"
        );
    }
}
