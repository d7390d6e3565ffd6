//! The origin servers and the proxies under test, configured from the
//! templates in benches/templates/ so all of them forward the same ports
//! to the same backends.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::config::{dir_str, nginx_command, write_config};
use crate::procs::{free_port, wait_http_ok, wait_listening, Guard};
use crate::tools::{path_of, NGINX_STREAM_MODULE};

const ORIGIN_TEMPLATE: &str = include_str!("../templates/origin-nginx.conf");
const HAPROXY_TEMPLATE: &str = include_str!("../templates/haproxy.cfg");
const NGINX_STREAM_TEMPLATE: &str = include_str!("../templates/nginx-stream.conf");
const FLEETGATE_TEMPLATE: &str = include_str!("../templates/fleetgate.toml");

/// How long a freshly started server gets to come up.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// Something load can be sent through: one of the proxies, or `Direct`
/// (the client talks to the origin itself), the ceiling the proxies are
/// measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Fleetgate,
    Haproxy,
    HaproxySplice,
    Nginx,
    Direct,
}

impl Target {
    /// The proxies, in the order the report's columns use.
    pub const PROXIES: [Target; 4] = [
        Target::Fleetgate,
        Target::Haproxy,
        Target::HaproxySplice,
        Target::Nginx,
    ];

    /// Column header in the report.
    pub fn label(self) -> &'static str {
        match self {
            Target::Fleetgate => "fleetgate",
            Target::Haproxy => "HAProxy",
            Target::HaproxySplice => "HAProxy(splice)",
            Target::Nginx => "nginx",
            Target::Direct => "direct (no proxy)",
        }
    }

    /// Name accepted by the PROXIES environment variable.
    pub fn key(self) -> &'static str {
        match self {
            Target::Fleetgate => "fleetgate",
            Target::Haproxy => "haproxy",
            Target::HaproxySplice => "haproxy-splice",
            Target::Nginx => "nginx",
            Target::Direct => "direct",
        }
    }
}

/// The origin nginx (HTTP) and the iperf3 server (bulk) behind every proxy.
pub struct Backends {
    pub origin: Guard,
    pub origin_port: u16,
    pub iperf: Guard,
    pub iperf_port: u16,
}

/// A target ready to take load: where to send it and which process to watch.
pub struct Running {
    pub target: Target,
    pub http_port: u16,
    pub bulk_port: u16,
    /// None for `Direct`, which has no proxy process.
    pub proxy: Option<Guard>,
}

/// What the proxies' configs can vary beyond ports.
pub struct ProxyOptions {
    pub fleetgate_bin: PathBuf,
    /// The `splice` value for fleetgate's listeners: `true`, `false` (the
    /// buffered copy path) or `"auto"`.
    pub fleetgate_splice: String,
}

pub fn start_backends(dir: &Path) -> Result<Backends> {
    let origin_port = free_port()?;
    let conf = write_config(
        dir,
        "origin-nginx.conf",
        ORIGIN_TEMPLATE,
        &[
            ("DIR", dir_str(dir)),
            ("ORIGIN_PORT", origin_port.to_string()),
        ],
    )?;
    let mut origin = Guard::spawn(
        "origin nginx",
        &mut nginx_command(dir, &conf),
        &dir.join("origin-nginx.out"),
    )?;
    wait_http_ok(&mut origin, origin_port, STARTUP_LIMIT)?;

    let iperf_port = free_port()?;
    let mut iperf = Guard::spawn(
        "iperf3 server",
        Command::new(path_of("iperf3")).args([
            "-s",
            "-B",
            "127.0.0.1",
            "-p",
            &iperf_port.to_string(),
        ]),
        &dir.join("iperf3-server.out"),
    )?;
    wait_listening(&mut iperf, iperf_port, STARTUP_LIMIT)?;
    Ok(Backends {
        origin,
        origin_port,
        iperf,
        iperf_port,
    })
}

/// Starts `target` in front of `backends` and waits until an HTTP request
/// makes it through to the origin.
pub fn start(
    target: Target,
    dir: &Path,
    backends: &Backends,
    opts: &ProxyOptions,
) -> Result<Running> {
    if target == Target::Direct {
        return Ok(Running {
            target,
            http_port: backends.origin_port,
            bulk_port: backends.iperf_port,
            proxy: None,
        });
    }
    let http_port = free_port()?;
    let bulk_port = free_port()?;
    let vars = vec![
        ("DIR", dir_str(dir)),
        ("HTTP_PORT", http_port.to_string()),
        ("BULK_PORT", bulk_port.to_string()),
        ("ORIGIN_PORT", backends.origin_port.to_string()),
        ("IPERF_PORT", backends.iperf_port.to_string()),
    ];
    let mut command = proxy_command(target, dir, vars, opts)?;
    let log = dir.join(format!("{}.out", target.key()));
    let mut proxy = Guard::spawn(target.label(), &mut command, &log)?;
    wait_http_ok(&mut proxy, http_port, STARTUP_LIMIT)?;
    Ok(Running {
        target,
        http_port,
        bulk_port,
        proxy: Some(proxy),
    })
}

/// Writes the target's config and returns the command that runs it in the
/// foreground as a single process we can watch through /proc.
fn proxy_command(
    target: Target,
    dir: &Path,
    mut vars: Vec<(&str, String)>,
    opts: &ProxyOptions,
) -> Result<Command> {
    let name = target.key();
    match target {
        Target::Haproxy | Target::HaproxySplice => {
            let splice = if target == Target::HaproxySplice {
                "option splice-auto"
            } else {
                ""
            };
            vars.push(("SPLICE", splice.into()));
            let conf = write_config(dir, &format!("{name}.cfg"), HAPROXY_TEMPLATE, &vars)?;
            let mut cmd = Command::new(path_of("haproxy"));
            // -db: stay in the foreground, no master/worker split.
            cmd.arg("-db").arg("-f").arg(conf);
            Ok(cmd)
        }
        Target::Nginx => {
            vars.push(("STREAM_MODULE", NGINX_STREAM_MODULE.into()));
            let conf = write_config(dir, "nginx-stream.conf", NGINX_STREAM_TEMPLATE, &vars)?;
            Ok(nginx_command(dir, &conf))
        }
        Target::Fleetgate => {
            vars.push(("ADMIN_PORT", free_port()?.to_string()));
            vars.push(("SPLICE", opts.fleetgate_splice.clone()));
            let conf = write_config(dir, "fleetgate.toml", FLEETGATE_TEMPLATE, &vars)?;
            let mut cmd = Command::new(&opts.fleetgate_bin);
            cmd.arg("run").arg("-c").arg(conf);
            Ok(cmd)
        }
        Target::Direct => bail!("direct has no proxy to start"),
    }
}
