//! fleetgate's `splice` modes as benchmark targets: FLEETGATE_SPLICE picks
//! one or several, and each runs as its own fleetgate instance and column.

use anyhow::{bail, Result};

/// How a fleetgate instance's listeners move bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Splice {
    /// No `splice` key in the config: whatever the build's default is.
    Default,
    /// `splice = true`: every byte through a pipe with splice(2).
    Always,
    /// `splice = "auto"`: buffered for small exchanges, spliced for bulk.
    Auto,
    /// `splice = false`: the buffered copy path.
    Copy,
}

impl Splice {
    /// Column header of the instance in the report.
    pub fn label(self) -> &'static str {
        match self {
            Splice::Default => "fleetgate",
            Splice::Always => "fleetgate(splice)",
            Splice::Auto => "fleetgate(auto)",
            Splice::Copy => "fleetgate(copy)",
        }
    }

    /// File names (config, log) of the instance.
    pub fn key(self) -> &'static str {
        match self {
            Splice::Default => "fleetgate",
            Splice::Always => "fleetgate-splice",
            Splice::Auto => "fleetgate-auto",
            Splice::Copy => "fleetgate-copy",
        }
    }

    /// The line each listener of the config gets.
    pub fn config_line(self) -> &'static str {
        match self {
            Splice::Default => "",
            Splice::Always => "splice = true",
            Splice::Auto => "splice = \"auto\"",
            Splice::Copy => "splice = false",
        }
    }
}

/// FLEETGATE_SPLICE: a comma list out of `default`, `true` (or `1`),
/// `auto`, `false` (or `0`), in column order; unset means `default` only.
pub fn modes_from_env() -> Result<Vec<Splice>> {
    let Ok(list) = std::env::var("FLEETGATE_SPLICE") else {
        return Ok(vec![Splice::Default]);
    };
    let mut modes = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let mode = match word {
            "default" => Splice::Default,
            "1" | "true" => Splice::Always,
            "auto" => Splice::Auto,
            "0" | "false" => Splice::Copy,
            other => {
                bail!("FLEETGATE_SPLICE: unknown {other:?}; use default, true, auto or false")
            }
        };
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    if modes.is_empty() {
        bail!("FLEETGATE_SPLICE is empty; use default, true, auto or false");
    }
    Ok(modes)
}
