//! The external programs the benchmark drives, and the machine it runs on.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::procs::command_text;

/// Where Debian's libnginx-mod-stream puts the module.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Fails with an install hint when one of `tools` or the nginx stream
/// module is missing, before anything is started.
pub fn check_installed(tools: &[&str]) -> Result<()> {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|tool| find_in_path(tool).is_none())
        .map(|tool| tool.to_string())
        .collect();
    if !Path::new(NGINX_STREAM_MODULE).exists() {
        missing.push(format!("{NGINX_STREAM_MODULE} (libnginx-mod-stream)"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "missing: {}\ninstall them with: bash benches/setup.sh",
        missing.join(", ")
    )
}

/// `which` without spawning one; /usr/sbin is added because haproxy and
/// nginx live there and it is not on every user's PATH.
fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Absolute path of `tool` (it was checked to exist).
pub fn path_of(tool: &str) -> PathBuf {
    find_in_path(tool).unwrap_or_else(|| PathBuf::from(tool))
}

/// One line per tool, e.g. "HAProxy version 2.6.12 ..."; `tools` are the
/// load generators (anything answering `-v`) besides haproxy and nginx.
pub fn versions(fleetgate: &Path, tools: &[&str]) -> Vec<(String, String)> {
    let first_line = |text: String| text.lines().next().unwrap_or("").to_string();
    let run = |tool: &str, args: &[&str]| {
        first_line(command_text(&path_of(tool).to_string_lossy(), args))
    };
    let mut lines = vec![
        ("fleetgate".into(), fleetgate_version(fleetgate)),
        ("haproxy".into(), run("haproxy", &["-v"])),
        ("nginx".into(), run("nginx", &["-v"])),
    ];
    lines.extend(tools.iter().map(|t| (t.to_string(), run(t, &["-v"]))));
    lines
}

fn fleetgate_version(fleetgate: &Path) -> String {
    let text = command_text(&fleetgate.to_string_lossy(), &["--version"]);
    match text.lines().next() {
        Some(line) if !line.is_empty() => format!("{line} ({})", fleetgate.display()),
        _ => format!("{} (no --version output)", fleetgate.display()),
    }
}

/// nproc, kernel and CPU model, for the header of the report.
pub fn machine() -> Vec<(String, String)> {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    vec![
        ("nproc".into(), command_text("nproc", &[])),
        ("kernel".into(), command_text("uname", &["-srm"])),
        ("cpu".into(), cpu),
    ]
}

/// The 1/5/15-minute load averages. Printed before and after the run because
/// anything else busy on the machine (a compile, say) skews every figure.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}
