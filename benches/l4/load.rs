//! The load generators: wrk for HTTP (benches/common/wrk.rs), iperf3 for
//! bulk bytes, and a parser for what iperf3 prints.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::procs::run_bounded;
use crate::targets::PASS_SNI;
use crate::tools::path_of;
pub use crate::wrk::HttpResult;

/// Headroom on top of the requested duration before a client is declared
/// wedged and killed (wrk and iperf3 need a moment to connect and report).
const CLIENT_GRACE: Duration = Duration::from_secs(20);

/// What one iperf3 run reports, as seen by the receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkResult {
    pub bytes: u64,
    pub gbit_per_sec: f64,
}

/// `wrk -t1 -c50 -d{secs}s --latency http://127.0.0.1:PORT/`; with
/// `close`, every request carries `Connection: close`, so each one is a
/// fresh TCP connection.
pub fn wrk(port: u16, secs: u64, close: bool) -> Result<HttpResult> {
    crate::wrk::wrk(&format!("http://127.0.0.1:{port}/"), secs, close)
}

/// `wrk -t1 -c50 -d{secs}s --latency https://localhost:PORT/`, keep-alive:
/// TLS to the origin through a passthrough port; wrk sends the URL's host
/// as SNI, the name the proxies route on.
pub fn wrk_passthrough(port: u16, secs: u64) -> Result<HttpResult> {
    crate::wrk::wrk(&format!("https://{PASS_SNI}:{port}/"), secs, false)
}

/// `iperf3 -c 127.0.0.1 -p PORT -t SECS -P STREAMS --json`, client sending.
pub fn iperf(port: u16, secs: u64, streams: u32) -> Result<BulkResult> {
    let mut cmd = Command::new(path_of("iperf3"));
    cmd.args(["-c", "127.0.0.1", "-p", &port.to_string()]);
    cmd.args([
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "--json",
    ]);
    let out = run_bounded(&mut cmd, Duration::from_secs(secs) + CLIENT_GRACE)?;
    let text = String::from_utf8_lossy(&out.stdout);
    // iperf3 exits non-zero on errors but still explains them in the JSON,
    // so parse first and only then look at the status.
    let parsed = parse_iperf(&text);
    if parsed.is_ok() && !out.status.success() {
        bail!("iperf3 failed ({}): {text}", out.status);
    }
    parsed
}

/// Uses `end.sum_received`: the bytes that actually made it through the
/// proxy to the server, summed over all parallel streams.
pub fn parse_iperf(text: &str) -> Result<BulkResult> {
    let json: Value = serde_json::from_str(text).context("iperf3 did not print JSON")?;
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3: {error}");
    }
    let sum = &json["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64().context("no end.sum_received.bytes")?;
    let bits = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")?;
    Ok(BulkResult {
        bytes,
        gbit_per_sec: bits / 1e9,
    })
}
