//! `fleetgate upgrade -c CONFIG [--binary PATH]`: ask the running process
//! (found through the configuration's control socket) to start the new
//! binary and hand over to it, and print the outcome.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::fdpass::Conn;
use super::protocol::{Answer, Request};

pub fn main(config: &Path, binary: Option<PathBuf>) -> ExitCode {
    match request(config, binary) {
        Ok(pid) => {
            println!("upgraded: process {pid} serves; the old process drains and exits");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgate upgrade: {e}");
            eprintln!("the running process goes on serving");
            ExitCode::FAILURE
        }
    }
}

fn request(config: &Path, binary: Option<PathBuf>) -> Result<u32, String> {
    let plan = crate::config::load(config).map_err(|e| e.to_string())?;
    // The running process may have another working directory.
    let binary = match binary {
        None => None,
        Some(b) => {
            Some(std::fs::canonicalize(&b).map_err(|e| format!("--binary {}: {e}", b.display()))?)
        }
    };
    let path = &plan.control_socket;
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the running fleetgate at {}: {e} (is it running with this configuration?)",
            path.display()
        )
    })?;
    let mut conn = Conn::new(stream);
    conn.send(&Request::Upgrade { binary })
        .map_err(|e| e.to_string())?;
    // The running process bounds each step of the upgrade itself.
    match conn.recv::<Answer>().map_err(|e| e.to_string())? {
        (Answer::Upgraded { pid }, _) => Ok(pid),
        (Answer::Failed { error }, _) => Err(error),
        (other, _) => Err(format!("unexpected answer {other:?}")),
    }
}
