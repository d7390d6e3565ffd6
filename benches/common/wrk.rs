//! wrk, the HTTP load generator, and a parser for what it prints.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs::run_bounded;
use crate::tools::path_of;

/// Headroom on top of the requested duration before wrk is declared wedged
/// and killed.
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

/// `wrk -t1 -c50 -d{secs}s --latency URL`; with `close`, every request
/// carries `Connection: close`, so each one is a fresh TCP connection (and,
/// over https, a new TLS session, which wrk resumes when it can).
pub fn wrk(url: &str, secs: u64, close: bool) -> Result<HttpResult> {
    wrk_connections(url, secs, 50, close)
}

/// `wrk` with `connections` instead of 50 (still one thread).
pub fn wrk_connections(
    url: &str,
    secs: u64,
    connections: usize,
    close: bool,
) -> Result<HttpResult> {
    let mut cmd = Command::new(path_of("wrk"));
    cmd.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url);
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
