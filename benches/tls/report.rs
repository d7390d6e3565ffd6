//! Collected samples and the markdown table made from them.

use std::collections::HashMap;

use crate::setup::Target;
use crate::table::{format_ratio, format_value, markdown, median};

/// The load tests, in the order they run and are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Test {
    /// wrk keep-alive over https, TLS terminated by the proxy.
    Offload,
    /// The same on a listener that logs every request: fleetgate's access
    /// log (JSON, to a file), nginx's (combined, to a file), HAProxy's
    /// `option httplog` to a local syslog receiver.
    OffloadLogged,
    /// Bench client, one request per connection, TLS 1.3, no resumption.
    FullHandshake,
    /// wrk with `Connection: close`: wrk resumes its TLS sessions.
    ResumedHandshake,
    /// wrk keep-alive over https through a TCP-mode proxy to a TLS origin.
    Passthrough,
    /// Bench client keep-alive presenting a client certificate, which the
    /// proxy verifies and forwards in X-SSL-CERT.
    ClientCert,
}

impl Test {
    pub const ALL: [Test; 6] = [
        Test::Offload,
        Test::OffloadLogged,
        Test::FullHandshake,
        Test::ResumedHandshake,
        Test::Passthrough,
        Test::ClientCert,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Test::Offload => "offload keep-alive",
            Test::OffloadLogged => "offload keep-alive with access log",
            Test::FullHandshake => "full handshakes",
            Test::ResumedHandshake => "wrk conn-close (resumed)",
            Test::Passthrough => "passthrough keep-alive",
            Test::ClientCert => "offload + client cert",
        }
    }

    /// The name `TESTS` selects it by.
    pub fn key(self) -> &'static str {
        match self {
            Test::Offload => "offload",
            Test::OffloadLogged => "offload-log",
            Test::FullHandshake => "handshakes",
            Test::ResumedHandshake => "resumed",
            Test::Passthrough => "passthrough",
            Test::ClientCert => "client-cert",
        }
    }

    fn unit(self) -> (&'static str, &'static str) {
        match self {
            Test::FullHandshake | Test::ResumedHandshake => ("handshakes/s", "handshake"),
            _ => ("requests/s", "request"),
        }
    }

    pub fn client_name(self) -> &'static str {
        match self {
            Test::FullHandshake | Test::ClientCert => "bench client",
            _ => "wrk",
        }
    }
}

/// What is measured per test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Rate,
    P50,
    P99,
    CpuPerUnit,
    ProxyLoad,
    ClientLoad,
    OriginLoad,
    /// Everything else on the machine; used for the saturation note only.
    OthersLoad,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Rate,
        Kind::P50,
        Kind::P99,
        Kind::CpuPerUnit,
        Kind::ProxyLoad,
        Kind::ClientLoad,
        Kind::OriginLoad,
    ];
}

/// One row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Figure {
    Run(Test, Kind),
    /// (RSS with the idle connections − RSS before) ÷ connections.
    IdleKibPerConn,
    /// RSS of the freshly started proxy before the idle connections.
    IdleRssBefore,
    /// Access log lines written (or syslog datagrams received) ÷ requests
    /// in the logged test: 1 when every request was logged.
    LogLinesPerRequest,
    OthersLoad,
    Errors,
}

impl Figure {
    fn all() -> Vec<Figure> {
        let mut all: Vec<Figure> = Test::ALL
            .iter()
            .flat_map(|&t| Kind::ALL.iter().map(move |&k| Figure::Run(t, k)))
            .collect();
        all.extend([
            Figure::LogLinesPerRequest,
            Figure::IdleKibPerConn,
            Figure::IdleRssBefore,
            Figure::OthersLoad,
            Figure::Errors,
        ]);
        all
    }

    fn label(self) -> String {
        match self {
            Figure::Run(test, kind) => {
                let (rate, unit) = test.unit();
                let name = test.label();
                match kind {
                    Kind::Rate => format!("{name}: {rate} ↑"),
                    Kind::P50 => format!("{name}: p50 latency, ms ↓"),
                    Kind::P99 => format!("{name}: p99 latency, ms ↓"),
                    Kind::CpuPerUnit => format!("{name}: proxy CPU µs/{unit} ↓"),
                    Kind::ProxyLoad => format!("{name}: proxy CPU, % of a core"),
                    Kind::ClientLoad => {
                        format!("{name}: {} CPU, % of a core", test.client_name())
                    }
                    Kind::OriginLoad => format!("{name}: origin CPU, % of a core"),
                    Kind::OthersLoad => format!("{name}: other processes' CPU, % of a core"),
                }
            }
            Figure::IdleKibPerConn => "idle offloaded connection: proxy KiB/connection ↓".into(),
            Figure::IdleRssBefore => "idle test: fresh proxy RSS before, MiB".into(),
            Figure::LogLinesPerRequest => format!(
                "{}: log lines per request (1 = all logged)",
                Test::OffloadLogged.label()
            ),
            Figure::OthersLoad => "other processes' CPU, % of a core".into(),
            Figure::Errors => "client errors, all runs (socket + non-2xx) ↓".into(),
        }
    }

    fn decimals(self) -> usize {
        match self {
            Figure::Run(_, Kind::Rate) => 0,
            Figure::Run(_, Kind::P50 | Kind::P99) => 3,
            Figure::Run(_, Kind::CpuPerUnit) => 1,
            Figure::Run(..) => 0,
            Figure::IdleKibPerConn | Figure::IdleRssBefore => 1,
            Figure::LogLinesPerRequest => 2,
            Figure::OthersLoad | Figure::Errors => 0,
        }
    }
}

/// Every sample taken, per target and figure.
#[derive(Default)]
pub struct Samples {
    values: HashMap<(Target, Figure), Vec<f64>>,
}

impl Samples {
    pub fn add(&mut self, target: Target, figure: Figure, value: f64) {
        if value.is_finite() {
            self.values.entry((target, figure)).or_default().push(value);
        }
    }

    /// Median over the rounds (errors: the sum), None if never measured.
    pub fn value(&self, target: Target, figure: Figure) -> Option<f64> {
        let samples = self.values.get(&(target, figure))?;
        if samples.is_empty() {
            return None;
        }
        Some(match figure {
            Figure::Errors => samples.iter().sum(),
            _ => median(samples),
        })
    }
}

pub fn proxy_table(samples: &Samples) -> String {
    let mut header: Vec<String> = vec!["figure".into()];
    header.extend(Target::ALL.iter().map(|t| t.label().to_string()));
    header.push("fleetgate/HAProxy".into());
    header.push("fleetgate/nginx".into());
    let mut rows = vec![header];
    for figure in Figure::all() {
        // Tests left out with TESTS (or never measured) get no row.
        if Target::ALL
            .iter()
            .all(|&t| samples.value(t, figure).is_none())
        {
            continue;
        }
        let mut row = vec![figure.label()];
        for target in Target::ALL {
            row.push(format_value(
                samples.value(target, figure),
                figure.decimals(),
            ));
        }
        let fleetgate = samples.value(Target::Fleetgate, figure);
        row.push(format_ratio(
            fleetgate,
            samples.value(Target::Haproxy, figure),
        ));
        row.push(format_ratio(
            fleetgate,
            samples.value(Target::Nginx, figure),
        ));
        rows.push(row);
    }
    markdown(&rows)
}

/// Which process was busiest in each test, per proxy: the side that
/// saturated (or came closest).
pub fn saturation(samples: &Samples) -> String {
    let mut out = String::from("Who saturated (median CPU, % of a core; 2 cores = 200 %):\n");
    for test in Test::ALL {
        let mut parts = Vec::new();
        for target in Target::ALL {
            let get = |kind| samples.value(target, Figure::Run(test, kind));
            let (Some(proxy), Some(client)) = (get(Kind::ProxyLoad), get(Kind::ClientLoad)) else {
                continue;
            };
            let origin = get(Kind::OriginLoad).unwrap_or(0.0);
            let others = get(Kind::OthersLoad).unwrap_or(0.0);
            let mut sides = [
                ("proxy", proxy),
                (test.client_name(), client),
                ("origin", origin),
            ];
            sides.sort_by(|a, b| b.1.total_cmp(&a.1));
            let verdict = if proxy + client + origin + others >= 180.0 {
                format!(
                    "both cores busy (other processes {others:.0}), {} heaviest",
                    sides[0].0
                )
            } else if sides[0].1 >= 90.0 {
                format!("{} saturated", sides[0].0)
            } else {
                "nothing saturated (latency-bound)".into()
            };
            parts.push(format!(
                "{}: proxy {proxy:.0}, {} {client:.0}, origin {origin:.0} → {verdict}",
                target.label(),
                test.client_name()
            ));
        }
        if !parts.is_empty() {
            out += &format!("- {}: {}\n", test.label(), parts.join("; "));
        }
    }
    out
}

/// The reference targets, checked against the medians.
pub fn targets(samples: &Samples) -> String {
    let v = |t: Target, f: Figure| samples.value(t, f);
    let fg = Target::Fleetgate;
    let ha = Target::Haproxy;
    let ng = Target::Nginx;
    let check = |name: &str, ours: Option<f64>, theirs: Option<f64>, limit: f64, lower: bool| {
        let line = match (ours, theirs) {
            (Some(a), Some(b)) if b != 0.0 => {
                let ratio = a / b;
                let met = if lower {
                    ratio <= limit
                } else {
                    ratio >= limit
                };
                format!(
                    "{a:.2} vs {b:.2} → {ratio:.2}× ({})",
                    if met { "met" } else { "MISSED" }
                )
            }
            _ => "n/a".into(),
        };
        format!("- {name}: {line}\n")
    };
    let run = |t, test, kind| v(t, Figure::Run(test, kind));
    let mut out = String::from("Targets (fleetgate vs reference):\n");
    out += &check(
        "CPU per full handshake ≤ 0.8× HAProxy",
        run(fg, Test::FullHandshake, Kind::CpuPerUnit),
        run(ha, Test::FullHandshake, Kind::CpuPerUnit),
        0.8,
        true,
    );
    out += &check(
        "full handshakes/s ≥ 1.0× HAProxy",
        run(fg, Test::FullHandshake, Kind::Rate),
        run(ha, Test::FullHandshake, Kind::Rate),
        1.0,
        false,
    );
    out += &check(
        "offload keep-alive requests/s ≥ 1.0× HAProxy",
        run(fg, Test::Offload, Kind::Rate),
        run(ha, Test::Offload, Kind::Rate),
        1.0,
        false,
    );
    out += &check(
        "offload keep-alive p99 ≤ HAProxy's",
        run(fg, Test::Offload, Kind::P99),
        run(ha, Test::Offload, Kind::P99),
        1.0,
        true,
    );
    out += &check(
        "KiB per idle offloaded connection ≤ 0.5× the better of HAProxy/nginx",
        v(fg, Figure::IdleKibPerConn),
        lower(v(ha, Figure::IdleKibPerConn), v(ng, Figure::IdleKibPerConn)),
        0.5,
        true,
    );
    let logged = |t, kind| run(t, Test::OffloadLogged, kind);
    out += &check(
        "CPU per request with access log ≤ 1.05× fleetgate's own without",
        logged(fg, Kind::CpuPerUnit),
        run(fg, Test::Offload, Kind::CpuPerUnit),
        1.05,
        true,
    );
    out += &check(
        "CPU per request with access log ≤ 0.9× the better of HAProxy/nginx with logging",
        logged(fg, Kind::CpuPerUnit),
        lower(logged(ha, Kind::CpuPerUnit), logged(ng, Kind::CpuPerUnit)),
        0.9,
        true,
    );
    out += &check(
        "p99 with access log ≤ the better of HAProxy/nginx with logging",
        logged(fg, Kind::P99),
        lower(logged(ha, Kind::P99), logged(ng, Kind::P99)),
        1.0,
        true,
    );
    out
}

/// The lower of two figures (the better anchor on ↓ rows), or the one
/// that was measured.
fn lower(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What logging every request costs each proxy: the offload keep-alive
/// test without and with its request log, side by side.
pub fn access_log(samples: &Samples) -> String {
    let mut rows = vec![{
        let mut h = vec!["offload keep-alive".to_string()];
        h.extend(Target::ALL.iter().map(|t| t.label().to_string()));
        h
    }];
    let run = |t, test, kind| samples.value(t, Figure::Run(test, kind));
    let ratio = |t, kind| match (
        run(t, Test::OffloadLogged, kind),
        run(t, Test::Offload, kind),
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    type Row<'a> = (&'a str, Box<dyn Fn(Target) -> Option<f64> + 'a>, usize);
    let lines: [Row; 7] = [
        (
            "proxy CPU µs/request, no log ↓",
            Box::new(|t| run(t, Test::Offload, Kind::CpuPerUnit)),
            1,
        ),
        (
            "proxy CPU µs/request, with log ↓",
            Box::new(|t| run(t, Test::OffloadLogged, Kind::CpuPerUnit)),
            1,
        ),
        (
            "CPU with log ÷ without ↓",
            Box::new(|t| ratio(t, Kind::CpuPerUnit)),
            3,
        ),
        (
            "p99 ms, no log ↓",
            Box::new(|t| run(t, Test::Offload, Kind::P99)),
            3,
        ),
        (
            "p99 ms, with log ↓",
            Box::new(|t| run(t, Test::OffloadLogged, Kind::P99)),
            3,
        ),
        (
            "requests/s with log ↑",
            Box::new(|t| run(t, Test::OffloadLogged, Kind::Rate)),
            0,
        ),
        (
            "log lines per request",
            Box::new(|t| samples.value(t, Figure::LogLinesPerRequest)),
            2,
        ),
    ];
    for (label, value, decimals) in lines {
        let mut row = vec![label.to_string()];
        row.extend(
            Target::ALL
                .iter()
                .map(|&t| format_value(value(t), decimals)),
        );
        rows.push(row);
    }
    format!(
        "Access log cost (fleetgate: JSON lines to a file; nginx: combined to a file; \
         HAProxy: `option httplog` to a UDP syslog receiver):\n\n{}",
        markdown(&rows)
    )
}

pub fn notes(rounds: u32, idle_conns: usize) -> String {
    format!(
        "Notes:\n\
         - Ratio columns are fleetgate ÷ other on every row: above 1 favours fleetgate \
         on ↑ rows, below 1 favours it on ↓ rows. Rows without an arrow are context \
         (CPU time ÷ wall time; 100 = one core).\n\
         - Each value is the median of {rounds} rounds (errors: sum over all runs).\n\
         - offload / resumed / passthrough: `wrk -t1 -c50 --latency https://…` (wrk \
         negotiates TLS 1.3 and resumes its session on every reconnect (PSK + ECDHE, \
         no certificate signature), so the conn-close row is a resumed handshake per \
         request: 835 of 845 resumed when checked with nginx's $ssl_session_reused). full handshakes / client cert: the \
         bench's rustls client, one thread, 50 connections, TLS 1.3; full handshakes \
         refuse resumption, so every request is a full ECDHE + ECDSA P-256 handshake.\n\
         - Proxy CPU µs per handshake = proxy user+sys over the run ÷ completed \
         requests (one per connection).\n\
         - Client certificate header: fleetgate and nginx forward URL-escaped PEM \
         ($ssl_client_escaped_cert, ~1 KB), HAProxy base64 DER (`%[ssl_c_der,base64]`, \
         ~0.6 KB): not byte-identical, but the same information.\n\
         - Passthrough: the TLS work is the origin nginx's; the proxy only moves bytes.\n\
         - With access log: the offload keep-alive test on a fourth listener that logs \
         every request; fleetgate JSON lines to a file, nginx `combined` to a file \
         (unbuffered, its default), HAProxy `option httplog` as one UDP datagram per \
         request to a receiver thread of the bench. Log lines per request counts what \
         reached the file or the receiver (1.00 = every request logged).\n\
         - Idle: a freshly started proxy per round; {idle_conns} TLS 1.3 connections \
         (bench client), one keep-alive request each, then idle; VmRSS 2 s after the \
         last one minus VmRSS before, ÷ connections.\n\
         - HAProxy and nginx run one thread; fleetgate its default runtime (one worker \
         per core). Load generator, proxy and origin share the machine's cores."
    )
}
