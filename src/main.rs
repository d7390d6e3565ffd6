//! The command line: `fleetgate run | check | agent | simulate | token`.
//! The balancer is the library; `agent` and `simulate` are tools built on
//! it, in `cli/`.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};

use fleetgate::{admin, config, logging, metrics::Metrics, runtime};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fleetgate",
    version,
    long_version = cli::version::long(),
    about = "Load balancer for device-management fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "conf/fleetgate.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file: prints `ok` and what a first start
    /// will create, or the error and exits 1. Writes nothing.
    Check {
        #[arg(short, long, default_value = "conf/fleetgate.toml")]
        config: PathBuf,
    },
    /// Announce local servers by heartbeat (the sidecar next to a
    /// management server that cannot speak the protocol itself).
    Agent {
        #[arg(short, long, default_value = "conf/agent.toml")]
        config: PathBuf,
    },
    /// Simulate a fleet of devices against the devices module (sizing
    /// and measurement; loopback targets only, see docs/simulator.md).
    Simulate(Box<cli::simulate::Options>),
    /// Replace the running process by a new binary without dropping a
    /// connection: the running process starts it, hands its listening
    /// sockets and stores over, and drains. Prints the new pid, or why
    /// not (the running process then goes on serving) and exits 1.
    Upgrade {
        #[arg(short, long, default_value = "conf/fleetgate.toml")]
        config: PathBuf,
        /// The new binary (default: the path the running one was started
        /// from, which a package upgrade has replaced).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Certificates: `renew` replaces the `cert = "auto"` pair.
    Cert {
        #[command(subcommand)]
        command: cli::cert::CertCommand,
    },
    /// Network tokens for discovery.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write the man pages (fleetgate.1 and one per subcommand) into DIR;
    /// the package build runs it.
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Write a fresh random 32-byte token to FILE (mode 0600).
    Generate {
        file: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => match config::load(&config) {
            Ok(plan) => {
                // Written, not println!: `fleetgate check | head -1` closes
                // the pipe early, which is no reason to panic.
                let mut text = String::from("ok\n");
                if !plan.first_start.is_empty() {
                    text.push_str("will create on first start:\n");
                    for line in plan.first_start.describe() {
                        text.push_str(&format!("  {line}\n"));
                    }
                }
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Token {
            command: TokenCommand::Generate { file, force },
        } => match fleetgate::discovery::token::generate(&file, force) {
            Ok(t) => {
                println!("wrote {} (fingerprint {})", file.display(), t.fingerprint());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleetgate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Agent { config } => {
            logging::init("info");
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(cli::agent::run_agent(&config)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fleetgate agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Simulate(opts) => cli::simulate::main(*opts),
        Command::Upgrade { config, binary } => fleetgate::upgrade::client::main(&config, binary),
        Command::Manpages { dir } => cli::manpages::main(Cli::command(), &dir),
        Command::Cert { command } => cli::cert::main(command),
        Command::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fleetgate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    logging::init("info");
    // Started by `fleetgate upgrade` to take over from a running process?
    let mut takeover = fleetgate::upgrade::Takeover::from_env();
    let result = start_and_serve(path, takeover.as_mut());
    if let (Err(e), Some(t)) = (&result, takeover.as_mut()) {
        t.failed(e);
    }
    // The last lines (drained, exiting) reach the syslog server too.
    fleetgate::syslog::stop();
    result
}

fn start_and_serve(
    path: PathBuf,
    mut takeover: Option<&mut fleetgate::upgrade::Takeover>,
) -> anyhow::Result<()> {
    let plan = config::load(&path)?;
    logging::init(&plan.log_level);
    fleetgate::syslog::configure(plan.syslog.as_ref())?;
    // The control plane (admin, health checks, discovery, reloads, modules'
    // background tasks) runs here; connections run on the workers that
    // `Runtime::start` creates, `worker_threads` of them.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    control.block_on(async move {
        let signals = runtime::Signals::install()?;
        let metrics = Arc::new(Metrics::new());
        let mut inherited = match takeover.as_deref_mut() {
            Some(t) => t.receive_sockets()?,
            None => Default::default(),
        };
        let admin_listener =
            admin::adopt_or_bind(plan.admin_bind, inherited.admin_for(plan.admin_bind)).await?;
        let control_socket = plan.control_socket.clone();
        let control = inherited.control_for(&control_socket);
        if let Some(t) = takeover.as_deref_mut() {
            t.release()?;
        }
        let registry = fleetgate::module::builtin::registry();
        let rt = runtime::Runtime::start_inherited(plan, metrics, &registry, inherited.listeners)
            .await?;
        fleetgate::upgrade::start(&rt, &admin_listener, &control_socket, control)?;
        tracing::info!(config = %path.display(), admin = %admin_listener.local_addr()?, "fleetgate started");
        tokio::spawn(admin::serve(admin_listener, rt.clone()));
        if let Some(t) = takeover {
            t.ready()?;
        }
        fleetgate::systemd::ready(&rt);
        fleetgate::systemd::spawn_watchdog(rt.clone());
        runtime::serve_until_signalled(rt, signals).await
    })
}
