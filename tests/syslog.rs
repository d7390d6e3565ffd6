//! Syslog export (RFC 5424): a strict receiver written here for UDP, TCP
//! (octet-counted) and a Unix datagram socket, the real rsyslog, and a
//! receiver that is down while the balancer keeps proxying.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------
// A strict RFC 5424 parser.

/// An SD-ELEMENT: its SD-ID and its (name, unescaped value) pairs.
type Element = (String, Vec<(String, String)>);

#[derive(Debug, Clone)]
struct Message {
    facility: u8,
    severity: u8,
    hostname: String,
    app_name: String,
    procid: String,
    msgid: String,
    sd: Vec<Element>,
    msg: String,
}

impl Message {
    fn param(&self, name: &str) -> Option<&str> {
        self.sd
            .iter()
            .flat_map(|(_, params)| params)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse one message exactly as RFC 5424 section 6 writes it; `Err` says
/// what broke the grammar.
fn parse(bytes: &[u8]) -> Result<Message, String> {
    let mut p = Parser { b: bytes, i: 0 };
    p.expect(b'<')?;
    let pri = p.take_while(|c| c.is_ascii_digit());
    if pri.is_empty() || pri.len() > 3 || (pri.len() > 1 && pri[0] == b'0') {
        return Err(format!("PRI {:?}", String::from_utf8_lossy(pri)));
    }
    let pri: u16 = std::str::from_utf8(pri).unwrap().parse().unwrap();
    if pri > 191 {
        return Err(format!("PRI {pri} > 191"));
    }
    p.expect(b'>')?;
    p.expect(b'1')?;
    p.expect(b' ')?;
    let ts = p.field(usize::MAX)?;
    if ts != "-" {
        check_timestamp(&ts)?;
    }
    p.expect(b' ')?;
    let hostname = p.field(255)?;
    p.expect(b' ')?;
    let app_name = p.field(48)?;
    p.expect(b' ')?;
    let procid = p.field(128)?;
    p.expect(b' ')?;
    let msgid = p.field(32)?;
    p.expect(b' ')?;
    let sd = p.structured_data()?;
    let msg = if p.i == p.b.len() {
        String::new()
    } else {
        p.expect(b' ')?;
        let rest = &p.b[p.i..];
        match rest.strip_prefix("\u{feff}".as_bytes()) {
            Some(utf8) => String::from_utf8(utf8.to_vec()).map_err(|e| format!("MSG: {e}"))?,
            None if rest.is_ascii() => String::from_utf8(rest.to_vec()).unwrap(),
            None => return Err("non-ASCII MSG without a BOM".into()),
        }
    };
    Ok(Message {
        facility: (pri / 8) as u8,
        severity: (pri % 8) as u8,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        msg,
    })
}

/// `FULL-DATE "T" FULL-TIME`: `YYYY-MM-DDTHH:MM:SS[.1-6 digits](Z|±HH:MM)`.
fn check_timestamp(ts: &str) -> Result<(), String> {
    let bad = || Err(format!("TIMESTAMP {ts:?}"));
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>, max: u32| -> bool {
        b.get(r.clone())
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
            && ts[r].parse::<u32>().is_ok_and(|v| v <= max)
    };
    if b.len() < 20 {
        return bad();
    }
    if !(digits(0..4, 9999)
        && b[4] == b'-'
        && digits(5..7, 12)
        && b[7] == b'-'
        && digits(8..10, 31)
        && b[10] == b'T'
        && digits(11..13, 23)
        && b[13] == b':'
        && digits(14..16, 59)
        && b[16] == b':'
        && digits(17..19, 60))
    {
        return bad();
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !(1..=6).contains(&n) {
            return bad();
        }
        i += 1 + n;
    }
    match &b[i..] {
        b"Z" => Ok(()),
        [s, ..] if (*s == b'+' || *s == b'-') && b.len() == i + 6 => {
            if digits(i + 1..i + 3, 23) && b[i + 3] == b':' && digits(i + 4..i + 6, 59) {
                Ok(())
            } else {
                bad()
            }
        }
        _ => bad(),
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!(
                "expected {:?} at {} in {:?}",
                c as char,
                self.i,
                String::from_utf8_lossy(self.b)
            ))
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &[u8] {
        let start = self.i;
        while self.i < self.b.len() && f(self.b[self.i]) {
            self.i += 1;
        }
        &self.b[start..self.i]
    }

    /// A header field: 1..=max PRINTUSASCII, or the NILVALUE.
    fn field(&mut self, max: usize) -> Result<String, String> {
        let f = self.take_while(|c| (33..=126).contains(&c));
        if f.is_empty() || f.len() > max {
            return Err(format!("header field of {} characters", f.len()));
        }
        Ok(String::from_utf8(f.to_vec()).unwrap())
    }

    fn sd_name(&mut self) -> Result<String, String> {
        let n = self.take_while(|c| (33..=126).contains(&c) && !b"= ]\"".contains(&c));
        if n.is_empty() || n.len() > 32 {
            return Err(format!("SD-NAME of {} characters", n.len()));
        }
        Ok(String::from_utf8(n.to_vec()).unwrap())
    }

    fn structured_data(&mut self) -> Result<Vec<Element>, String> {
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
            return Ok(Vec::new());
        }
        let mut elements = Vec::new();
        while self.b.get(self.i) == Some(&b'[') {
            self.i += 1;
            let id = self.sd_name()?;
            let mut params = Vec::new();
            while self.b.get(self.i) == Some(&b' ') {
                self.i += 1;
                let name = self.sd_name()?;
                self.expect(b'=')?;
                self.expect(b'"')?;
                let mut value = Vec::new();
                loop {
                    match self.b.get(self.i) {
                        None => return Err("unterminated PARAM-VALUE".into()),
                        Some(b'"') => break,
                        Some(b']') => return Err("unescaped ']' in PARAM-VALUE".into()),
                        Some(b'\\')
                            if matches!(self.b.get(self.i + 1), Some(b'"' | b'\\' | b']')) =>
                        {
                            value.push(self.b[self.i + 1]);
                            self.i += 2;
                        }
                        Some(&c) => {
                            value.push(c);
                            self.i += 1;
                        }
                    }
                }
                self.i += 1;
                let value = String::from_utf8(value).map_err(|e| format!("PARAM-VALUE: {e}"))?;
                params.push((name, value));
            }
            self.expect(b']')?;
            if elements.iter().any(|(e, _)| *e == id) {
                return Err(format!("SD-ID {id} twice"));
            }
            elements.push((id, params));
        }
        if elements.is_empty() {
            return Err("STRUCTURED-DATA is neither '-' nor an element".into());
        }
        Ok(elements)
    }
}

// ---------------------------------------------------------------------
// Receivers.

/// What a receiver got: parsed messages, and anything that did not parse.
#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    errors: Vec<String>,
}

type Shared = Arc<Mutex<Inbox>>;

fn deliver(inbox: &Shared, bytes: &[u8]) {
    let mut i = inbox.lock().unwrap();
    match parse(bytes) {
        Ok(m) => i.messages.push(m),
        Err(e) => i
            .errors
            .push(format!("{e}: {:?}", String::from_utf8_lossy(bytes))),
    }
}

struct Receiver {
    inbox: Shared,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Receiver {
    fn udp(addr: SocketAddr) -> Receiver {
        let sock = UdpSocket::bind(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Self::spawn(move |inbox, stop| {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    deliver(&inbox, &buf[..n]);
                }
            }
        })
    }

    fn unix(path: &Path) -> Receiver {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Self::spawn(move |inbox, stop| {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    deliver(&inbox, &buf[..n]);
                }
            }
        })
    }

    /// Octet-counted TCP (RFC 6587 §3.4.1): `MSG-LEN SP SYSLOG-MSG`, the
    /// length without leading zeros. Anything else is an error.
    fn tcp(addr: SocketAddr) -> Receiver {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        Self::spawn(move |inbox, stop| {
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let (inbox, stop) = (inbox.clone(), stop.clone());
                        conns.push(thread::spawn(move || read_frames(c, inbox, stop)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            drop(listener);
            for c in conns {
                c.join().unwrap();
            }
        })
    }

    fn spawn(f: impl FnOnce(Shared, Arc<AtomicBool>) + Send + 'static) -> Receiver {
        let inbox = Shared::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s) = (inbox.clone(), stop.clone());
        Receiver {
            inbox,
            stop,
            threads: vec![thread::spawn(move || f(i, s))],
        }
    }

    /// Wait for a message that `want` accepts; panics with what arrived.
    fn wait_for(&self, what: &str, want: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let i = self.inbox.lock().unwrap();
                assert!(i.errors.is_empty(), "malformed: {:#?}", i.errors);
                if let Some(m) = i.messages.iter().find(|m| want(m)) {
                    return m.clone();
                }
                if Instant::now() > deadline {
                    panic!("no {what}; got {:#?}", i.messages);
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self) -> usize {
        self.inbox.lock().unwrap().messages.len()
    }

    /// Close the sockets (and the TCP connections).
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn read_frames(mut c: std::net::TcpStream, inbox: Shared, stop: Arc<AtomicBool>) {
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => continue,
        }
        while let Some(sp) = buf.iter().position(|&b| b == b' ') {
            let len = &buf[..sp];
            let ok = !len.is_empty()
                && len.len() <= 9
                && len[0] != b'0'
                && len.iter().all(u8::is_ascii_digit);
            if !ok {
                let e = format!("bad frame length {:?}", String::from_utf8_lossy(len));
                inbox.lock().unwrap().errors.push(e);
                return;
            }
            let n: usize = std::str::from_utf8(len).unwrap().parse().unwrap();
            if buf.len() < sp + 1 + n {
                break;
            }
            deliver(&inbox, &buf[sp + 1..sp + 1 + n]);
            buf.drain(..sp + 1 + n);
        }
    }
}

// ---------------------------------------------------------------------
// The balancer, at level info (the default test level is warn).

fn start_info(config: &str) -> Balancer {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let path = dir.path().join("fleetgate.toml");
    std::fs::write(&path, config.replace("{admin}", &admin.to_string())).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn fleetgate");
    let b = Balancer {
        child,
        dir,
        config: path,
        admin,
    };
    assert!(
        eventually(Duration::from_secs(20), || http_get(admin, "/healthz")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))),
        "fleetgate did not become ready"
    );
    b
}

const CHECK: &str = "health_check = { kind = \"tcp\", interval = \"100ms\", rise = 1, fall = 1 }";

fn config(
    front: SocketAddr,
    backends: &[SocketAddr],
    syslog: Option<(&str, &str, &str)>,
) -> String {
    let list: Vec<(SocketAddr, u32)> = backends.iter().map(|a| (*a, 1)).collect();
    let mut c = tcp_config(front, "round_robin", &list, CHECK);
    if let Some((address, facility, app_name)) = syslog {
        c.push_str(&format!(
            "\n[syslog]\naddress = \"{address}\"\nfacility = \"{facility}\"\napp_name = \"{app_name}\"\n"
        ));
    }
    c
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// The header fields every message from this balancer carries.
fn check_origin(m: &Message, lb: &Balancer, facility: u8, app_name: &str) {
    assert_eq!(m.facility, facility, "{m:?}");
    assert_eq!(m.app_name, app_name, "{m:?}");
    assert_eq!(m.procid, lb.pid().to_string(), "{m:?}");
    assert_eq!(m.hostname, host_name(), "{m:?}");
}

fn is_event(m: &Message, severity: u8, text: &str) -> bool {
    m.msgid == "event" && m.severity == severity && m.msg.contains(text)
}

const INFO: u8 = 6;
const WARNING: u8 = 4;

// ---------------------------------------------------------------------

/// The events of a running balancer reach a strict receiver over each
/// transport, the reload switching from one to the next: UDP gets the
/// start and a backend going down, TCP the reload that chose it, the Unix
/// socket another reload and a backend going down; removing `[syslog]`
/// is said to the last server.
#[test]
fn events_over_udp_tcp_and_unix_follow_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (udp_addr, tcp_addr) = (free_addr(), free_addr());
    let sock = dir.path().join("log.sock");
    let udp = Receiver::udp(udp_addr);
    let tcp = Receiver::tcp(tcp_addr);
    let unix = Receiver::unix(&sock);

    let a = NamedBackend::start("a");
    let mut b = NamedBackend::start("b");
    let mut c = NamedBackend::start("c");
    let backends = [a.addr, b.addr, c.addr];
    let front = free_addr();
    let udp_url = format!("udp://{udp_addr}");
    let lb = start_info(&config(
        front,
        &backends,
        Some((&udp_url, "local3", "fg-udp")),
    ));

    let listening = udp.wait_for("start event", |m| is_event(m, INFO, "listening"));
    check_origin(&listening, &lb, 19, "fg-udp");
    assert_eq!(listening.param("listener"), Some("front"));
    assert_eq!(listening.param("bind"), Some(front.to_string().as_str()));
    assert_eq!(listening.sd[0].0, "fleetgate@32473");

    // A backend of the health-checked pool goes down.
    b.stop();
    let down = udp.wait_for("backend down", |m| {
        is_event(m, WARNING, "backend down") && m.param("backend") == Some(&b.addr.to_string())
    });
    check_origin(&down, &lb, 19, "fg-udp");
    assert_eq!(down.param("pool"), Some("p"));
    assert!(
        down.msg
            .starts_with("backend down: health check failed pool=p backend="),
        "{}",
        down.msg
    );
    assert!(ask(front).is_ok());

    // SIGHUP with a new address, facility and app_name: TCP from now on.
    let tcp_url = format!("tcp://{tcp_addr}");
    lb.write_config(&config(
        front,
        &backends,
        Some((&tcp_url, "daemon", "fg-tcp")),
    ));
    lb.signal("HUP");
    let switched = udp.wait_for("switch notice", |m| is_event(m, INFO, &tcp_url));
    check_origin(&switched, &lb, 19, "fg-udp");
    let reloaded = tcp.wait_for("reload event", |m| {
        is_event(m, INFO, "configuration reloaded")
    });
    check_origin(&reloaded, &lb, 3, "fg-tcp");

    // Then the Unix datagram socket, and another backend goes down.
    let unix_url = format!("unix://{}", sock.display());
    lb.write_config(&config(
        front,
        &backends,
        Some((&unix_url, "local7", "fg-unix")),
    ));
    lb.signal("HUP");
    let reloaded = unix.wait_for("reload event", |m| {
        is_event(m, INFO, "configuration reloaded")
    });
    check_origin(&reloaded, &lb, 23, "fg-unix");
    c.stop();
    let down = unix.wait_for("backend down", |m| {
        is_event(m, WARNING, "backend down") && m.param("backend") == Some(&c.addr.to_string())
    });
    check_origin(&down, &lb, 23, "fg-unix");
    assert_eq!(ask(front).unwrap(), "a");

    // Removed: the last server hears it.
    lb.write_config(&config(front, &backends, None));
    lb.signal("HUP");
    unix.wait_for("removal notice", |m| is_event(m, INFO, "no longer sending"));
    let sent = lb.metric("fleetgate_syslog_messages_total{stream=\"events\"}");
    let received = udp.count() + tcp.count() + unix.count();
    assert!(sent >= received as f64, "sent {sent}, received {received}");
    assert!(received >= 6, "{received}");
    for r in [udp, tcp, unix] {
        r.stop();
    }
}

// ---------------------------------------------------------------------
// The real rsyslog.

struct Rsyslog {
    child: Child,
    out: PathBuf,
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Rsyslog {
    /// `rsyslogd -n` on its own configuration: imudp and imtcp on
    /// 127.0.0.1 and imuxsock on `dir/log.sock`, every message written to a file with its RFC 5424
    /// fields separated by `|`.
    fn start(dir: &Path, udp: SocketAddr, tcp: SocketAddr) -> Rsyslog {
        let out = dir.join("received.log");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{dir}")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
# A socket of its own (never the system's /dev/log), with the regular
# parser chain: imuxsock's default parser reads only the traditional
# local format and would take "1" (the RFC 5424 version) for the tag.
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{dir}/log.sock" UseSpecialParser="off" ParseHostname="on")
template(name="fields" type="string"
  string="%syslogfacility-text%|%syslogseverity-text%|%protocol-version%|%timereported:::date-rfc3339%|%hostname%|%app-name%|%procid%|%msgid%|%structured-data%|%msg%\n")
*.* action(type="omfile" file="{out}" template="fields")
"#,
                dir = dir.display(),
                udp_port = udp.port(),
                tcp_port = tcp.port(),
                out = out.display(),
            ),
        )
        .unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .spawn()
            .expect("rsyslogd (Debian package rsyslog) must be installed");
        wait_listening(tcp);
        Rsyslog { child, out }
    }

    /// The written lines, split into their fields.
    fn lines(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| l.splitn(10, '|').map(str::to_string).collect())
            .collect()
    }

    fn wait_for(&self, what: &str, want: impl Fn(&[String]) -> bool) -> Vec<String> {
        let mut found = None;
        let ok = eventually(Duration::from_secs(30), || {
            found = self.lines().into_iter().find(|l| l.len() == 10 && want(l));
            found.is_some()
        });
        assert!(ok, "rsyslog wrote no {what}: {:#?}", self.lines());
        found.unwrap()
    }
}

#[test]
fn rsyslog_receives_events_over_udp_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let (udp, tcp) = (free_addr(), free_addr());
    let rsyslog = Rsyslog::start(dir.path(), udp, tcp);

    let mut a = NamedBackend::start("a");
    let b = NamedBackend::start("b");
    let front = free_addr();
    let backends = [a.addr, b.addr];
    let udp_url = format!("udp://{udp}");
    let lb = start_info(&config(
        front,
        &backends,
        Some((&udp_url, "local4", "fleetgate-u")),
    ));
    let pid = lb.pid().to_string();

    let started = rsyslog.wait_for("start event", |l| l[9].contains("fleetgate started"));
    assert_eq!(&started[..3], ["local4", "info", "1"]);
    assert_eq!(
        &started[4..8],
        [
            host_name(),
            "fleetgate-u".into(),
            pid.clone(),
            "event".into()
        ]
    );
    assert!(check_timestamp(&started[3]).is_ok(), "{}", started[3]);
    assert!(
        started[8].starts_with("[fleetgate@32473 "),
        "{}",
        started[8]
    );

    // Over TCP after a reload, and a backend going down.
    let tcp_url = format!("tcp://{tcp}");
    lb.write_config(&config(
        front,
        &backends,
        Some((&tcp_url, "local5", "fleetgate-t")),
    ));
    lb.signal("HUP");
    let reloaded = rsyslog.wait_for("reload event", |l| {
        l[5] == "fleetgate-t" && l[9].contains("configuration reloaded")
    });
    assert_eq!(&reloaded[..3], ["local5", "info", "1"]);
    assert_eq!(reloaded[6], pid);
    a.stop();
    let down = rsyslog.wait_for("backend down", |l| {
        l[5] == "fleetgate-t" && l[9].contains("backend down")
    });
    assert_eq!(&down[..3], ["local5", "warning", "1"]);
    assert!(
        down[8].contains(&format!("backend=\"{}\"", a.addr)),
        "{}",
        down[8]
    );
    assert_eq!(ask(front).unwrap(), "b");

    // The local socket, as `/dev/log` would be.
    let unix_url = format!("unix://{}", dir.path().join("log.sock").display());
    lb.write_config(&config(
        front,
        &backends,
        Some((&unix_url, "user", "fleetgate-x")),
    ));
    lb.signal("HUP");
    let reloaded = rsyslog.wait_for("reload event over the socket", |l| {
        l[5] == "fleetgate-x" && l[9].contains("configuration reloaded")
    });
    assert_eq!(&reloaded[..3], ["user", "info", "1"]);
    assert_eq!(
        &reloaded[4..8],
        [host_name(), "fleetgate-x".into(), pid, "event".into()]
    );
    assert!(
        reloaded[8].starts_with("[fleetgate@32473 target="),
        "{}",
        reloaded[8]
    );
}

// ---------------------------------------------------------------------
// A receiver that is down.

/// Reload until `cond` holds: each reload logs an event, so messages keep
/// coming while the sender waits out its backoff.
fn reload_until(lb: &Balancer, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        lb.signal("HUP");
        thread::sleep(Duration::from_millis(200));
    }
}

fn down_and_back(scheme: &str) {
    let port = free_addr();
    let a = NamedBackend::start("a");
    let front = free_addr();
    let url = format!("{scheme}://{port}");
    let lb = start_info(&config(front, &[a.addr], Some((&url, "user", "fg"))));
    let dropped = || lb.metric("fleetgate_syslog_dropped_total{reason=\"unreachable\"}");
    let sent = || lb.metric("fleetgate_syslog_messages_total{stream=\"events\"}");

    // Nothing listens (TCP: refused connects; UDP: ICMP port unreachable).
    reload_until(&lb, "drops counted", || dropped() >= 2.0);
    for _ in 0..20 {
        assert_eq!(ask(front).unwrap(), "a");
    }

    // The receiver starts: the sender reconnects and messages flow.
    let receiver = match scheme {
        "tcp" => Receiver::tcp(port),
        _ => Receiver::udp(port),
    };
    reload_until(&lb, "messages after the restart", || receiver.count() > 0);
    let m = receiver.wait_for("reload event", |m| {
        is_event(m, INFO, "configuration reloaded")
    });
    check_origin(&m, &lb, 1, "fg");
    assert!(sent() >= 1.0);

    // Down again: proxying goes on, drops rise again.
    receiver.stop();
    let before = dropped();
    reload_until(&lb, "drops counted again", || dropped() > before);
    for _ in 0..20 {
        assert_eq!(ask(front).unwrap(), "a");
    }
    let text = lb.metrics();
    assert!(
        text.contains("fleetgate_syslog_dropped_total{reason=\"queue_full\"}"),
        "{text}"
    );
}

#[test]
fn tcp_receiver_down_drops_and_reconnects() {
    down_and_back("tcp");
}

#[test]
fn udp_receiver_down_drops_and_reconnects() {
    down_and_back("udp");
}

/// The receiver's parser is strict: each of these breaks RFC 5424.
#[test]
fn the_test_parser_refuses_malformed_messages() {
    let good =
        "<28>1 2026-12-03T06:56:40.123456Z lb1 fleetgate 42 event [x@32473 a=\"q\\\"\\]\"] hi";
    let m = parse(good.as_bytes()).unwrap();
    assert_eq!((m.facility, m.severity), (3, 4));
    assert_eq!(m.param("a"), Some("q\"]"));
    assert_eq!(m.msg, "hi");
    for bad in [
        "<028>1 2026-12-03T06:56:40Z h a 1 m - x",
        "<192>1 2026-12-03T06:56:40Z h a 1 m - x",
        "<28>2 2026-12-03T06:56:40Z h a 1 m - x",
        "<28>1 2026-12-03 06:56:40Z h a 1 m - x",
        "<28>1 2026-12-03T06:56:40.1234567Z h a 1 m - x",
        "<28>1 2026-12-03T06:56:40+0100 h a 1 m - x",
        "<28>1 2026-12-03T06:56:40Z h  1 m - x",
        "<28>1 2026-12-03T06:56:40Z h a 1 mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm - x",
        "<28>1 2026-12-03T06:56:40Z h a 1 m [x a=\"]\"] x",
        "<28>1 2026-12-03T06:56:40Z h a 1 m [x a=b] x",
        "<28>1 2026-12-03T06:56:40Z h a 1 m x",
        "<28>1 2026-12-03T06:56:40Z h a 1 m - größe",
    ] {
        assert!(parse(bad.as_bytes()).is_err(), "accepted {bad:?}");
    }
}

/// `access_log = { path = "syslog" }`: each connection's line reaches the
/// server as its own message (MSGID `access`, severity info), in the
/// listener's format, with the client's port in it.
#[test]
fn access_lines_reach_syslog() {
    let port = free_addr();
    let receiver = Receiver::udp(port);
    let a = NamedBackend::start("a");
    let front = free_addr();
    let config = config(
        front,
        &[a.addr],
        Some((&format!("udp://{port}"), "local3", "fg-access")),
    )
    .replace(
        "pool = \"p\"\n",
        "pool = \"p\"\naccess_log = { path = \"syslog\", format = \"json\" }\n",
    );
    let lb = start_info(&config);
    let mut ports = Vec::new();
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(front).unwrap();
        ports.push(s.local_addr().unwrap().port());
        let mut name = String::new();
        s.read_to_string(&mut name).unwrap();
        assert_eq!(name.trim(), "a");
    }
    for p in ports {
        let m = receiver.wait_for("the connection's access line", |m| {
            m.msgid == "access" && m.msg.contains(&format!("\"client_port\":{p}"))
        });
        check_origin(&m, &lb, 19, "fg-access");
        assert_eq!(m.severity, INFO, "{m:?}");
        let line: serde_json::Value = serde_json::from_str(&m.msg).expect("a JSON line");
        assert_eq!(line["listener"], "front", "{line}");
        assert_eq!(line["upstream"], a.addr.to_string(), "{line}");
    }
    assert!(lb.metric("fleetgate_syslog_messages_total{stream=\"access\"}") >= 5.0);
}
