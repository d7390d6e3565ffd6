//! `fleetgate cert renew`: a new self-signed pair for the `cert = "auto"`
//! listeners, written over the old files (key first, then certificate,
//! each to a temporary file renamed into place). A running fleetgate
//! picks it up through its certificate watch, or at the next SIGHUP when
//! the listener has `tls.watch = false`; established connections keep
//! the certificate they were made with.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use fleetgate::config::{self, schema};
use fleetgate::tls::certs;

#[derive(Subcommand)]
pub enum CertCommand {
    /// Replace the `cert = "auto"` self-signed certificate and key with a
    /// new pair; prints its SHA-256 fingerprint.
    Renew {
        #[arg(short, long, default_value = "conf/fleetgate.toml")]
        config: PathBuf,
        /// The listener whose `auto_names` the new certificate carries
        /// (default: the first `cert = "auto"` listener, as at first
        /// start). The pair is shared: every such listener serves it.
        #[arg(long)]
        listener: Option<String>,
    },
}

pub fn main(command: CertCommand) -> ExitCode {
    let CertCommand::Renew { config, listener } = command;
    match renew(&config, listener.as_deref()) {
        Ok(renewed) => {
            println!(
                "wrote {} and {}",
                renewed.cert.display(),
                renewed.key.display()
            );
            println!("sha256 {}", renewed.fingerprint);
            println!(
                "served by listener(s) {}: a running fleetgate uses it for new \
                 connections within seconds (tls.watch), or after SIGHUP when watch = false",
                renewed.listeners.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgate cert renew: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Renewed {
    cert: PathBuf,
    key: PathBuf,
    fingerprint: String,
    /// Every listener that serves the pair.
    listeners: Vec<String>,
}

fn renew(path: &Path, listener: Option<&str>) -> anyhow::Result<Renewed> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: schema::File = toml::from_str(&text)
        .with_context(|| format!("{}: invalid configuration", path.display()))?;
    let auto: Vec<(&str, &schema::ListenerTls)> = file
        .listeners
        .iter()
        .filter_map(|l| Some((l.name.as_str(), l.tls.as_ref()?)))
        .filter(|(_, t)| t.cert == "auto")
        .collect();
    let names = match listener {
        Some(name) => {
            if !file.listeners.iter().any(|l| l.name == name) {
                anyhow::bail!("{}: no listener named {name:?}", path.display());
            }
            let Some((_, t)) = auto.iter().find(|(n, _)| *n == name) else {
                anyhow::bail!(
                    "listener {name:?} does not use cert = \"auto\": renew its certificate where it is issued"
                );
            };
            &t.auto_names
        }
        None => match auto.first() {
            Some((_, t)) => &t.auto_names,
            None => anyhow::bail!(
                "{}: no listener uses cert = \"auto\"; nothing to renew",
                path.display()
            ),
        },
    };
    // As validation resolves it: relative to the configuration file.
    let base = path.parent().unwrap_or(Path::new("."));
    let data_dir = base.join(&file.global.data_dir);
    let (cert, key) = config::auto_cert_paths(&data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let pair = certs::self_signed(names)?;
    certs::write_self_signed(&pair, &cert, &key)?;
    Ok(Renewed {
        cert,
        key,
        fingerprint: pair.fingerprint,
        listeners: auto.iter().map(|(n, _)| n.to_string()).collect(),
    })
}
