//! Certificates, the origin nginx and the three proxies, configured from
//! benches/templates/tls/ so all of them serve the same listeners:
//! offload, offload with an optional client certificate (mtls),
//! passthrough, and offload with an access log (logged).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rustls::ClientConfig;

use crate::certs::{openssl, server_certificate, EC_P256};
use crate::client;
use crate::config::{dir_str, nginx_command, write_config};
use crate::procs::{free_port, wait_http_ok, Guard};
use crate::syslog::SyslogSink;
use crate::tools::{path_of, NGINX_STREAM_MODULE};

const ORIGIN_TEMPLATE: &str = include_str!("../templates/tls/origin-nginx.conf");
const HAPROXY_TEMPLATE: &str = include_str!("../templates/tls/haproxy.cfg");
const NGINX_TEMPLATE: &str = include_str!("../templates/tls/nginx.conf");
const FLEETGATE_TEMPLATE: &str = include_str!("../templates/tls/fleetgate.toml");

/// How long a freshly started server gets to come up.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// The client certificate files (in the temp dir) of the mtls test.
pub const CLIENT_CERT: (&str, &str) = ("client.pem", "client.key");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Fleetgate,
    Haproxy,
    Nginx,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Fleetgate, Target::Haproxy, Target::Nginx];

    pub fn label(self) -> &'static str {
        match self {
            Target::Fleetgate => "fleetgate",
            Target::Haproxy => "HAProxy",
            Target::Nginx => "nginx",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Target::Fleetgate => "fleetgate",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
        }
    }
}

/// One certificate for every server (ECDSA P-256, self-signed, for
/// 127.0.0.1), and a device CA with one client certificate.
pub fn make_certificates(dir: &Path) -> Result<()> {
    server_certificate(dir)?;
    let ec = EC_P256;
    openssl(
        dir,
        &[&["req", "-x509"], &ec[..], &["-nodes", "-days", "7"]],
        &[
            "-keyout",
            "client-ca.key",
            "-out",
            "client-ca.pem",
            "-subj",
            "/CN=bench device CA",
        ],
    )?;
    openssl(
        dir,
        &[&["req"], &ec[..], &["-nodes"]],
        &[
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=device-0001/O=bench",
        ],
    )?;
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        dir,
        &[&["x509", "-req", "-days", "7", "-set_serial", "2"]],
        &[
            "-in",
            "client.csr",
            "-CA",
            "client-ca.pem",
            "-CAkey",
            "client-ca.key",
            "-extfile",
            "client.ext",
            "-out",
            "client.pem",
        ],
    )
}

/// The origin nginx: plain HTTP and TLS.
pub struct Origin {
    pub guard: Guard,
    pub http_port: u16,
    pub tls_port: u16,
}

pub fn start_origin(dir: &Path) -> Result<Origin> {
    let http_port = free_port()?;
    let tls_port = free_port()?;
    let conf = write_config(
        dir,
        "origin-nginx.conf",
        ORIGIN_TEMPLATE,
        &[
            ("DIR", dir_str(dir)),
            ("ORIGIN_PORT", http_port.to_string()),
            ("ORIGIN_TLS_PORT", tls_port.to_string()),
        ],
    )?;
    let mut guard = Guard::spawn(
        "origin nginx",
        &mut nginx_command(dir, &conf),
        &dir.join("origin-nginx.out"),
    )?;
    wait_http_ok(&mut guard, http_port, STARTUP_LIMIT)?;
    Ok(Origin {
        guard,
        http_port,
        tls_port,
    })
}

/// A proxy ready to take load.
pub struct Running {
    pub target: Target,
    pub offload_port: u16,
    pub mtls_port: u16,
    pub pass_port: u16,
    /// Offload with the access log on.
    pub logged_port: u16,
    /// Where the logged listener's lines go.
    pub log: LogSource,
    pub proxy: Guard,
}

/// Where a proxy's logged listener puts its lines, so they can be counted.
pub enum LogSource {
    /// fleetgate's and nginx's access log file.
    File(PathBuf),
    /// HAProxy's `option httplog`: datagrams at the bench's syslog receiver.
    Syslog(Arc<AtomicU64>),
}

impl LogSource {
    /// Where the log stands now: the file's length, or datagrams so far.
    pub fn mark(&self) -> Result<u64> {
        Ok(match self {
            LogSource::File(path) => match std::fs::metadata(path) {
                Ok(m) => m.len(),
                // fleetgate builds without the access log ignore the key.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e.into()),
            },
            LogSource::Syslog(count) => count.load(Ordering::Relaxed),
        })
    }

    /// Lines logged since `mark`.
    pub fn lines_since(&self, mark: u64) -> Result<u64> {
        match self {
            LogSource::File(path) => {
                let mut file = match File::open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                    Err(e) => return Err(e.into()),
                };
                file.seek(SeekFrom::Start(mark))?;
                let mut lines = 0;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        return Ok(lines);
                    }
                    lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                }
            }
            LogSource::Syslog(count) => Ok(count.load(Ordering::Relaxed) - mark),
        }
    }
}

/// Starts `target` in front of `origin` and waits until a TLS request
/// makes it through each listener to the origin. `instance` tells apart
/// the configs and logs of several starts of the same proxy. HAProxy's
/// request log goes to `syslog`.
pub fn start(
    target: Target,
    instance: &str,
    dir: &Path,
    origin: &Origin,
    fleetgate_bin: &Path,
    probe_config: &Arc<ClientConfig>,
    syslog: &SyslogSink,
) -> Result<Running> {
    let offload_port = free_port()?;
    let mtls_port = free_port()?;
    let pass_port = free_port()?;
    let logged_port = free_port()?;
    let name = format!("{}{instance}", target.key());
    let access_log = dir.join(format!("{name}-access.log"));
    let log = match target {
        Target::Haproxy => LogSource::Syslog(syslog.counter()),
        Target::Fleetgate | Target::Nginx => LogSource::File(access_log.clone()),
    };
    let mut vars = vec![
        ("DIR", dir_str(dir)),
        ("OFFLOAD_PORT", offload_port.to_string()),
        ("MTLS_PORT", mtls_port.to_string()),
        ("PASS_PORT", pass_port.to_string()),
        ("LOGGED_PORT", logged_port.to_string()),
        ("SYSLOG_PORT", syslog.port.to_string()),
        ("ACCESS_LOG", dir_str(&access_log)),
        ("ORIGIN_PORT", origin.http_port.to_string()),
        ("ORIGIN_TLS_PORT", origin.tls_port.to_string()),
    ];
    let mut cmd = match target {
        Target::Haproxy => {
            let conf = write_config(dir, &format!("{name}.cfg"), HAPROXY_TEMPLATE, &vars)?;
            let mut cmd = Command::new(path_of("haproxy"));
            cmd.arg("-db").arg("-f").arg(conf);
            cmd
        }
        Target::Nginx => {
            vars.push(("STREAM_MODULE", NGINX_STREAM_MODULE.into()));
            // Each instance gets its own pid file and error log.
            let template = NGINX_TEMPLATE
                .replace("nginx.pid", &format!("{name}.pid"))
                .replace("nginx.error.log", &format!("{name}.error.log"));
            let conf = write_config(dir, &format!("{name}.conf"), &template, &vars)?;
            nginx_command(dir, &conf)
        }
        Target::Fleetgate => {
            vars.push(("ADMIN_PORT", free_port()?.to_string()));
            let conf = write_config(dir, &format!("{name}.toml"), FLEETGATE_TEMPLATE, &vars)?;
            let mut cmd = Command::new(fleetgate_bin);
            cmd.arg("run").arg("-c").arg(conf);
            cmd
        }
    };
    let mut proxy = Guard::spawn(target.label(), &mut cmd, &dir.join(format!("{name}.out")))?;
    for port in [offload_port, mtls_port, pass_port, logged_port] {
        wait_tls_ok(&mut proxy, port, probe_config)?;
    }
    Ok(Running {
        target,
        offload_port,
        mtls_port,
        pass_port,
        logged_port,
        log,
        proxy,
    })
}

fn wait_tls_ok(guard: &mut Guard, port: u16, config: &Arc<ClientConfig>) -> Result<()> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    loop {
        guard.ensure_running()?;
        let error = match client::probe(port, config.clone()) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!("127.0.0.1:{port} not serving over TLS after {STARTUP_LIMIT:?}: {error:#}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The fleetgate binary cargo built next to this bench, unless
/// FLEETGATE_BIN points at another build.
pub fn fleetgate_bin() -> PathBuf {
    std::env::var_os("FLEETGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fleetgate")))
}
