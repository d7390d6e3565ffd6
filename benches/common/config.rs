//! Rendering configs from templates, and starting nginx inside the
//! harness's temp dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tools::path_of;

/// nginx with its prefix and early error log in our temp dir, so it never
/// touches /etc/nginx or /var/log/nginx.
pub fn nginx_command(dir: &Path, conf: &Path) -> Command {
    let mut cmd = Command::new(path_of("nginx"));
    cmd.arg("-p").arg(dir).arg("-c").arg(conf);
    cmd.arg("-e").arg(dir.join("nginx-early.error.log"));
    cmd
}

pub fn write_config(
    dir: &Path,
    file: &str,
    template: &str,
    vars: &[(&str, String)],
) -> Result<PathBuf> {
    let path = dir.join(file);
    let text = render(template, vars).with_context(|| format!("rendering {file}"))?;
    fs::write(&path, text)?;
    Ok(path)
}

/// Replaces every `@NAME@` in `template`. None of the configs use '@'
/// otherwise, so one left over means a variable was forgotten.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut text = template.to_string();
    for (name, value) in vars {
        text = text.replace(&format!("@{name}@"), value);
    }
    if let Some(pos) = text.find('@') {
        let rest: String = text[pos..].chars().take(30).collect();
        bail!("unfilled placeholder near {rest:?}");
    }
    Ok(text)
}

pub fn dir_str(dir: &Path) -> String {
    dir.to_string_lossy().into_owned()
}
