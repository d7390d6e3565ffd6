//! `/metrics` after known traffic, parsed by the reference Python parser
//! (`prometheus_client.parser`, `pip install prometheus_client`), and the
//! other admin routes.

mod common;
mod support_l4;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{eventually, free_addr, http_get, Balancer};
use support_l4::{config, must};

/// Prints every sample as one JSON document; exits non-zero (with the
/// parser's traceback) on anything it cannot parse.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "help": fam.documentation,
                    "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

#[derive(Debug)]
struct Sample {
    family: String,
    kind: String,
    help: String,
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Run the Python parser on `text`: the samples, or its error output.
fn python_parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PARSE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for this test");
    let mut stdin = child.stdin.take().unwrap();
    let text = text.to_string();
    let feeder = thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("No module named 'prometheus_client'"),
        "install the parser: python3 -m pip install prometheus_client"
    );
    if !out.status.success() {
        return Err(stderr);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parser output: {e}"))?;
    Ok(json
        .as_array()
        .expect("a list of samples")
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().unwrap().to_string(),
            kind: s["type"].as_str().unwrap().to_string(),
            help: s["help"].as_str().unwrap().to_string(),
            name: s["name"].as_str().unwrap().to_string(),
            labels: s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect())
}

/// The one sample named `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: HashMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one sample {name}{labels:?}, found {}",
        found.len()
    );
    found[0].value
}

/// Reads the request to EOF, then answers `reply` bytes and closes.
struct SizedBackend {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
}

fn start_sized_backend(reply: usize) -> SizedBackend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (s, r) = (served.clone(), received.clone());
    thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let (s, r) = (s.clone(), r.clone());
            thread::spawn(move || {
                let mut req = Vec::new();
                if c.read_to_end(&mut req).is_ok() {
                    r.fetch_add(req.len(), Ordering::SeqCst);
                    let _ = c.write_all(&vec![b'r'; reply]);
                    s.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    SizedBackend {
        addr,
        served,
        received,
    }
}

#[test]
fn counters_match_known_traffic_and_parse() {
    const N: usize = 20;
    let (reply_a, reply_b) = (3000, 5000);
    let a = start_sized_backend(reply_a);
    let b = start_sized_backend(reply_b);
    let front = free_addr();
    let fg = Balancer::start(&config(front, &[a.addr, b.addr], "", ""));

    let mut sent_total = 0usize;
    let mut got_total = 0usize;
    for i in 0..N {
        let request = vec![b'q'; 1000 + 37 * i];
        let mut s = TcpStream::connect(front).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&request).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        assert!(
            reply.len() == reply_a || reply.len() == reply_b,
            "connection {i}: {} bytes back",
            reply.len()
        );
        sent_total += request.len();
        got_total += reply.len();
    }
    let (served_a, served_b) = (
        a.served.load(Ordering::SeqCst),
        b.served.load(Ordering::SeqCst),
    );
    assert_eq!(served_a + served_b, N);
    assert_eq!(
        a.received.load(Ordering::SeqCst) + b.received.load(Ordering::SeqCst),
        sent_total
    );
    assert_eq!(got_total, served_a * reply_a + served_b * reply_b);
    // Every connection has ended on the balancer's side too.
    assert!(eventually(Duration::from_secs(5), || must(
        &fg.metrics(),
        "fleetgate_connections_active",
        &[("listener", "front")]
    ) == 0.0));

    let response = http_get(fg.admin, "/metrics").unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let samples = python_parse(body)
        .unwrap_or_else(|e| panic!("the exposition does not parse:\n{e}\n{body}"));
    assert!(!samples.is_empty());

    let front_l = [("listener", "front")];
    assert_eq!(
        value(&samples, "fleetgate_connections_accepted_total", &front_l),
        N as f64
    );
    assert_eq!(
        value(&samples, "fleetgate_connections_active", &front_l),
        0.0
    );
    let bytes = |dir| {
        value(
            &samples,
            "fleetgate_proxied_bytes_total",
            &[("listener", "front"), ("direction", dir)],
        )
    };
    assert_eq!(bytes("upstream"), sent_total as f64);
    assert_eq!(bytes("downstream"), got_total as f64);
    for reason in ["acl", "limit", "no_backend"] {
        assert_eq!(
            value(
                &samples,
                "fleetgate_connections_rejected_total",
                &[("listener", "front"), ("reason", reason)]
            ),
            0.0,
            "{reason}"
        );
    }
    for (backend, served) in [(a.addr, served_a), (b.addr, served_b)] {
        let l = [("pool", "p"), ("backend", &*backend.to_string())];
        assert_eq!(
            value(&samples, "fleetgate_pool_selections_total", &l),
            served as f64,
            "selections of {backend}"
        );
        assert_eq!(
            value(
                &samples,
                "fleetgate_backend_connect_duration_seconds_count",
                &l
            ),
            served as f64,
            "timed connects to {backend}"
        );
        let mut inf = l.to_vec();
        inf.push(("le", "+Inf"));
        assert_eq!(
            value(
                &samples,
                "fleetgate_backend_connect_duration_seconds_bucket",
                &inf
            ),
            served as f64
        );
        assert_eq!(value(&samples, "fleetgate_backend_up", &l), 1.0);
        assert_eq!(
            value(&samples, "fleetgate_backend_connections_active", &l),
            0.0
        );
        assert_eq!(
            value(&samples, "fleetgate_backend_connect_failures_total", &l),
            0.0
        );
    }
    // Round robin over two idle backends splits evenly.
    assert_eq!((served_a, served_b), (N / 2, N / 2));

    // Every family is fleetgate's, typed and documented.
    for s in &samples {
        assert!(s.name.starts_with("fleetgate_"), "{s:?}");
        assert!(!s.help.is_empty(), "{} has no HELP", s.family);
        let want = if s.family.ends_with("_seconds") {
            "histogram"
        } else if s.name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert_eq!(s.kind, want, "type of {}", s.family);
    }
}

/// The harness itself can fail: a broken exposition is reported as such.
#[test]
fn python_parser_rejects_a_broken_exposition() {
    let good = "# HELP x_total A counter.\n# TYPE x_total counter\nx_total{a=\"b\"} 3\n";
    let parsed = python_parse(good).expect("a valid exposition");
    assert_eq!(value(&parsed, "x_total", &[("a", "b")]), 3.0);
    for bad in [
        "x_total{a=\"b\" 3\n",
        "x_total{a=b} 3\n",
        "x_total{a=\"b\"} three\n",
    ] {
        assert!(python_parse(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn admin_routes() {
    let backend = start_sized_backend(1);
    let front = free_addr();
    let fg = Balancer::start(&config(front, &[backend.addr], "", ""));

    let healthz = http_get(fg.admin, "/healthz").unwrap();
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(healthz.ends_with("\r\n\r\nok\n"), "{healthz:?}");

    // `/` is the status page (tests/status_page.rs).
    let page = http_get(fg.admin, "/").unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");

    for path in ["/nope", "/metrics/extra", "/healthz2"] {
        let r = http_get(fg.admin, path).unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }

    let mut s = TcpStream::connect(fg.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");

    // Before any event the series exist at zero: a counter that first
    // appears at 1 hides that increase from rate() and increase(), so an
    // alert on the first failed reload or rejection would never fire.
    let text = fg.metrics();
    let samples = python_parse(&text).unwrap();
    assert_eq!(
        value(
            &samples,
            "fleetgate_connections_accepted_total",
            &[("listener", "front")]
        ),
        0.0
    );
    for reason in ["acl", "limit", "no_backend"] {
        assert_eq!(
            value(
                &samples,
                "fleetgate_connections_rejected_total",
                &[("listener", "front"), ("reason", reason)]
            ),
            0.0
        );
    }
    for result in ["ok", "error"] {
        assert_eq!(
            value(
                &samples,
                "fleetgate_config_reloads_total",
                &[("result", result)]
            ),
            0.0,
            "reloads {result}"
        );
    }
}
