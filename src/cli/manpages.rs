//! `fleetgate manpages DIR` (hidden): writes the man pages the Debian
//! package installs, from the clap definition that parses the command
//! line, so they cannot drift from it: `fleetgate.1`, and one page per
//! subcommand, nested ones included (`fleetgate-token-generate.1`), as git
//! names its pages. The package build gzips them.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Command;
use clap_mangen::roff::{bold, roman, Roff};

pub fn main(cli: Command, dir: &Path) -> ExitCode {
    match write_all(cli, dir) {
        Ok(pages) => {
            for page in pages {
                println!("{}", page.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgate manpages: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// Write every page into `dir` (created if missing); returns their paths.
pub fn write_all(cli: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let name = cli.get_name().to_string();
    write_page(&cli, &name, &name, dir, &mut written)?;
    Ok(written)
}

/// `page` names the file (`fleetgate-token-generate`), `invocation` what
/// one types (`fleetgate token generate`), which the synopsis shows.
fn write_page(
    cmd: &Command,
    page: &str,
    invocation: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    // clap takes `'static` names (its `string` feature is off): a handful
    // of short strings, in a command that exits at once.
    let leak = |s: &str| -> &'static str { s.to_string().leak() };
    let shown = cmd
        .clone()
        // The page's name is also the prefix clap_mangen gives the pages it
        // lists under SUBCOMMANDS, which are the files written below.
        .name(leak(page))
        .bin_name(leak(invocation))
        // `help` is clap's own and has no page of its own.
        .disable_help_subcommand(true)
        // The feature lines describe the machine that ran the build, not
        // the program; `--version` prints them.
        .long_version(None);
    let man = clap_mangen::Man::new(shown)
        .source(format!("fleetgate {}", env!("CARGO_PKG_VERSION")))
        .manual("fleetgate manual");
    let mut text = Vec::new();
    man.render(&mut text)?;
    text.extend(see_also(page).into_bytes());
    let path = dir.join(format!("{page}.1"));
    std::fs::write(&path, text)?;
    written.push(path);
    // Hidden commands (this one) are tools for the build.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        write_page(
            sub,
            &format!("{page}-{name}"),
            &format!("{invocation} {name}"),
            dir,
            written,
        )?;
    }
    Ok(())
}

/// What the CLI definition cannot say: on the main page, where the Debian
/// package puts things (docs/install.md); on every page, where to read on.
fn see_also(page: &str) -> String {
    let mut roff = Roff::new();
    if page == "fleetgate" {
        roff.control("SH", ["FILES"]);
        for (path, what) in [
            (
                "/etc/fleetgate/fleetgate.toml",
                "The configuration the systemd unit runs with.",
            ),
            (
                "/var/lib/fleetgate",
                "The data directory: generated certificates, the devices module's CA and database.",
            ),
            ("/var/log/fleetgate", "The access log."),
            (
                "/usr/share/doc/fleetgate",
                "The documentation (install.md, configuration.md, operations.md, tls.md, ...; the larger files gzipped).",
            ),
        ] {
            roff.control("TP", [])
                .text([bold(path)])
                .text([roman(what)]);
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    if page != "fleetgate" {
        refs.extend([bold("fleetgate"), roman("(1), ")]);
    }
    refs.extend([
        bold("systemctl"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1); the unit "),
        bold("fleetgate.service"),
        roman("."),
    ]);
    roff.text(refs);
    roff.to_roff()
}
