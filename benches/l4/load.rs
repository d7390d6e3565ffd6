//! The load generators: wrk for HTTP, iperf3 for bulk bytes, and parsers
//! for what they print.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::procs::run_bounded;
use crate::tools::path_of;

/// Headroom on top of the requested duration before a client is declared
/// wedged and killed (wrk and iperf3 need a moment to connect and report).
const CLIENT_GRACE: Duration = Duration::from_secs(20);

/// What one wrk run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResult {
    /// Requests completed ("N requests in ...").
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Socket errors of every kind plus non-2xx/3xx responses.
    pub errors: u64,
}

/// What one iperf3 run reports, as seen by the receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkResult {
    pub bytes: u64,
    pub gbit_per_sec: f64,
}

/// `wrk -t1 -c50 -d{secs}s --latency`; with `close`, every request carries
/// `Connection: close`, so each one is a fresh TCP connection.
pub fn wrk(port: u16, secs: u64, close: bool) -> Result<HttpResult> {
    let mut cmd = Command::new(path_of("wrk"));
    cmd.args(["-t1", "-c50", &format!("-d{secs}s"), "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/"));
    let out = run_bounded(&mut cmd, Duration::from_secs(secs) + CLIENT_GRACE)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))
}

pub fn parse_wrk(text: &str) -> Result<HttpResult> {
    let mut result = HttpResult {
        requests: 0,
        requests_per_sec: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        errors: 0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => result.p50_us = duration_us(value)?,
            ["99%", value] => result.p99_us = duration_us(value)?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["Requests/sec:", value] => result.requests_per_sec = value.parse()?,
            ["Socket", "errors:", ..] => result.errors += socket_errors(line)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => result.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    if result.requests_per_sec.is_nan() || result.p99_us.is_nan() || result.p50_us.is_nan() {
        bail!("no Requests/sec or latency distribution found");
    }
    Ok(result)
}

/// "Socket errors: connect 0, read 3, write 0, timeout 1" -> 4
fn socket_errors(line: &str) -> Result<u64> {
    let counts = line.split_once(':').map(|(_, c)| c).unwrap_or("");
    counts
        .split(',')
        .filter_map(|part| part.split_whitespace().nth(1))
        .map(|n| n.parse::<u64>().context("socket error count"))
        .sum()
}

/// wrk prints durations as e.g. "812.00us", "1.23ms", "2.00s", "1.00m".
fn duration_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(value * scale)
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
