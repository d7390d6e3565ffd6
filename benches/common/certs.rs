//! Certificates made with openssl in the harness's temp dir, the way an
//! operator would make them, so every server under test reads the same
//! files.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// openssl's arguments for a new ECDSA P-256 key.
pub const EC_P256: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// One server certificate for every TLS server: ECDSA P-256, self-signed,
/// for 127.0.0.1 and `localhost` (the name SNI routing matches on).
/// Writes `server.pem`, `server.key`, and `server-combined.pem` (both in
/// one file, as HAProxy wants them).
pub fn server_certificate(dir: &Path) -> Result<()> {
    openssl(
        dir,
        &[&["req", "-x509"], &EC_P256[..], &["-nodes", "-days", "7"]],
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.pem",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
    )?;
    let combined = std::fs::read_to_string(dir.join("server.pem"))?
        + &std::fs::read_to_string(dir.join("server.key"))?;
    std::fs::write(dir.join("server-combined.pem"), combined)?;
    Ok(())
}

/// Runs `openssl PARTS… REST…` in `dir`; fails with openssl's message.
pub fn openssl(dir: &Path, parts: &[&[&str]], rest: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    for part in parts {
        cmd.args(*part);
    }
    cmd.args(rest).current_dir(dir);
    let out = cmd.output().context("running openssl")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
