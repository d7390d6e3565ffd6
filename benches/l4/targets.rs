//! The origin servers and the proxies under test, configured from the
//! templates in benches/templates/ so all of them forward the same ports
//! to the same backends.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::certs::server_certificate;
use crate::config::{dir_str, nginx_command, write_config};
use crate::procs::{free_port, wait_http_ok, wait_listening, Guard};
use crate::splice::Splice;
use crate::tls_probe::https_ok;
use crate::tools::{path_of, NGINX_STREAM_MODULE};

const ORIGIN_TEMPLATE: &str = include_str!("../templates/origin-nginx.conf");
const HAPROXY_TEMPLATE: &str = include_str!("../templates/haproxy.cfg");
const NGINX_STREAM_TEMPLATE: &str = include_str!("../templates/nginx-stream.conf");
const FLEETGATE_TEMPLATE: &str = include_str!("../templates/fleetgate.toml");

/// The server name the passthrough clients send (SNI) and every proxy's
/// passthrough rule routes on. wrk sends the URL's host as SNI, and
/// `localhost` resolves to 127.0.0.1.
pub const PASS_SNI: &str = "localhost";

/// How long a freshly started server gets to come up.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// Something load can be sent through: one of the proxies, or `Direct`
/// (the client talks to the origin itself), the ceiling the proxies are
/// measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Fleetgate(Splice),
    Haproxy,
    HaproxySplice,
    Nginx,
    Direct,
}

impl Target {
    /// The other proxies, in the order the report's columns use (after
    /// the fleetgate instances).
    pub const OTHERS: [Target; 3] = [Target::Haproxy, Target::HaproxySplice, Target::Nginx];

    /// Column header in the report.
    pub fn label(self) -> &'static str {
        match self {
            Target::Fleetgate(splice) => splice.label(),
            Target::Haproxy => "HAProxy",
            Target::HaproxySplice => "HAProxy(splice)",
            Target::Nginx => "nginx",
            Target::Direct => "direct (no proxy)",
        }
    }

    /// Name accepted by the PROXIES environment variable (`fleetgate`
    /// stands for every FLEETGATE_SPLICE mode).
    pub fn key(self) -> &'static str {
        match self {
            Target::Fleetgate(_) => "fleetgate",
            Target::Haproxy => "haproxy",
            Target::HaproxySplice => "haproxy-splice",
            Target::Nginx => "nginx",
            Target::Direct => "direct",
        }
    }

    /// Config and log file names of the target.
    fn file_key(self) -> &'static str {
        match self {
            Target::Fleetgate(splice) => splice.key(),
            other => other.key(),
        }
    }
}

/// The origin nginx (HTTP and TLS) and the iperf3 server (bulk) behind
/// every proxy.
pub struct Backends {
    pub origin: Guard,
    pub origin_port: u16,
    pub origin_tls_port: u16,
    pub iperf: Guard,
    pub iperf_port: u16,
}

/// A target ready to take load: where to send it and which process to watch.
pub struct Running {
    pub target: Target,
    pub http_port: u16,
    pub bulk_port: u16,
    /// TLS passthrough, routed on SNI to the origin's TLS port.
    pub pass_port: u16,
    /// None for `Direct`, which has no proxy process.
    pub proxy: Option<Guard>,
}

/// What the proxies' configs can vary beyond ports and splice modes.
pub struct ProxyOptions {
    pub fleetgate_bin: PathBuf,
    /// fleetgate's `worker_threads`; None leaves the key out (one worker
    /// per core).
    pub fleetgate_workers: Option<u64>,
}

pub fn start_backends(dir: &Path) -> Result<Backends> {
    server_certificate(dir)?;
    let origin_port = free_port()?;
    let origin_tls_port = free_port()?;
    let conf = write_config(
        dir,
        "origin-nginx.conf",
        ORIGIN_TEMPLATE,
        &[
            ("DIR", dir_str(dir)),
            ("ORIGIN_PORT", origin_port.to_string()),
            ("ORIGIN_TLS_PORT", origin_tls_port.to_string()),
        ],
    )?;
    let mut origin = Guard::spawn(
        "origin nginx",
        &mut nginx_command(dir, &conf),
        &dir.join("origin-nginx.out"),
    )?;
    wait_http_ok(&mut origin, origin_port, STARTUP_LIMIT)?;
    wait_https_ok(&mut origin, origin_tls_port)?;

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
        origin_tls_port,
        iperf,
        iperf_port,
    })
}

/// Starts `target` in front of `backends` and waits until an HTTP request
/// makes it through to the origin, and an HTTPS one through passthrough.
/// `instance` tells apart the files of several starts of the same proxy.
pub fn start(
    target: Target,
    instance: &str,
    dir: &Path,
    backends: &Backends,
    opts: &ProxyOptions,
) -> Result<Running> {
    if target == Target::Direct {
        return Ok(Running {
            target,
            http_port: backends.origin_port,
            bulk_port: backends.iperf_port,
            pass_port: backends.origin_tls_port,
            proxy: None,
        });
    }
    let http_port = free_port()?;
    let bulk_port = free_port()?;
    let pass_port = free_port()?;
    let name = format!("{}{instance}", target.file_key());
    let vars = vec![
        ("DIR", dir_str(dir)),
        ("NAME", name.clone()),
        ("HTTP_PORT", http_port.to_string()),
        ("BULK_PORT", bulk_port.to_string()),
        ("PASS_PORT", pass_port.to_string()),
        ("PASS_SNI", PASS_SNI.to_string()),
        ("ORIGIN_PORT", backends.origin_port.to_string()),
        ("ORIGIN_TLS_PORT", backends.origin_tls_port.to_string()),
        ("IPERF_PORT", backends.iperf_port.to_string()),
    ];
    let mut command = proxy_command(target, &name, dir, vars, opts)?;
    let log = dir.join(format!("{name}.out"));
    let mut proxy = Guard::spawn(target.label(), &mut command, &log)?;
    wait_http_ok(&mut proxy, http_port, STARTUP_LIMIT)?;
    wait_https_ok(&mut proxy, pass_port)?;
    Ok(Running {
        target,
        http_port,
        bulk_port,
        pass_port,
        proxy: Some(proxy),
    })
}

/// Waits until an HTTPS request with the passthrough SNI gets a 200.
fn wait_https_ok(guard: &mut Guard, port: u16) -> Result<()> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    loop {
        guard.ensure_running()?;
        let error = match https_ok(port, PASS_SNI) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!("127.0.0.1:{port} not serving HTTPS after {STARTUP_LIMIT:?}: {error:#}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Writes the target's config and returns the command that runs it in the
/// foreground as a single process we can watch through /proc.
fn proxy_command(
    target: Target,
    name: &str,
    dir: &Path,
    mut vars: Vec<(&str, String)>,
    opts: &ProxyOptions,
) -> Result<Command> {
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
            // A port nothing listens on: where unmatched SNI goes.
            vars.push(("NO_ROUTE_PORT", free_port()?.to_string()));
            let conf = write_config(dir, &format!("{name}.conf"), NGINX_STREAM_TEMPLATE, &vars)?;
            Ok(nginx_command(dir, &conf))
        }
        Target::Fleetgate(splice) => {
            vars.push(("ADMIN_PORT", free_port()?.to_string()));
            vars.push(("SPLICE_LINE", splice.config_line().into()));
            let workers = opts.fleetgate_workers;
            let workers = workers.map_or(String::new(), |n| format!("worker_threads = {n}"));
            vars.push(("WORKERS_LINE", workers));
            vars.push(("DATA_DIR", dir_str(&dir.join(format!("{name}-data")))));
            let conf = write_config(dir, &format!("{name}.toml"), FLEETGATE_TEMPLATE, &vars)?;
            let mut cmd = Command::new(&opts.fleetgate_bin);
            cmd.arg("run").arg("-c").arg(conf);
            Ok(cmd)
        }
        Target::Direct => bail!("direct has no proxy to start"),
    }
}
