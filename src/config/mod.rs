//! Configuration: TOML file → `schema::File` (serde) → `Plan` (validated).

pub mod duration;
pub mod error;
mod file_stamp;
mod first_start;
pub mod locate;
mod logs;
pub mod plan;
mod proxy_protocol;
pub mod schema;
mod tls;
pub mod validate;

use std::path::Path;

pub use error::ConfigError;
pub use file_stamp::FileStamp;
pub use first_start::FirstStart;
pub use plan::*;
pub use tls::auto_cert_paths;

/// Read, parse and validate a configuration file, knowing the built-in
/// module kinds.
pub fn load(path: &Path) -> Result<Plan, ConfigError> {
    load_with(path, &crate::module::builtin::registry())
}

/// Like `load`, with the module kinds of `modules` (for programs that
/// embed fleetgate and register their own).
pub fn load_with(path: &Path, modules: &crate::module::Registry) -> Result<Plan, ConfigError> {
    let text = read(path)?;
    parse_with(&text, path, modules)
}

/// Read and validate the configuration of a running process again (a
/// reload): the new plan shares the running plan's module state (the
/// revocation lists that its listeners consult). Writes nothing; the
/// caller writes `first_start` before applying the plan.
pub fn load_next(
    path: &Path,
    modules: &crate::module::Registry,
    running: &Plan,
) -> Result<Plan, ConfigError> {
    let text = read(path)?;
    parse_impl(&text, path, modules, Some(running))
}

/// Validate the running configuration again as it was last loaded (the
/// text of the running plan, not the file as it is now), which re-reads
/// the certificate, key and CA files it names: what applies a renewed
/// certificate. Writes nothing, like `load_next`.
pub fn load_again(modules: &crate::module::Registry, running: &Plan) -> Result<Plan, ConfigError> {
    let text = running.origin.text.clone();
    parse_impl(&text, &running.source, modules, Some(running))
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read the file: {e}"),
    })
}

/// Parse and validate configuration text; `path` is used in errors.
pub fn parse(text: &str, path: &Path) -> Result<Plan, ConfigError> {
    parse_with(text, path, &crate::module::builtin::registry())
}

pub fn parse_with(
    text: &str,
    path: &Path,
    modules: &crate::module::Registry,
) -> Result<Plan, ConfigError> {
    parse_impl(text, path, modules, None)
}

fn parse_impl(
    text: &str,
    path: &Path,
    modules: &crate::module::Registry,
    running: Option<&Plan>,
) -> Result<Plan, ConfigError> {
    let de = toml::Deserializer::new(text);
    let file: schema::File = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let offset = inner.span().map(|s| s.start).or_else(|| {
            let segs = parse_serde_path(&key);
            locate::offset_of(text, &segs)
        });
        let message = match inner.message() {
            // The TOML parser has no words for some syntax errors (a
            // control character in a comment, for one): name what it
            // stopped at rather than print an empty message.
            m if m.trim().is_empty() => syntax_error_at(text, offset),
            m => m.to_string(),
        };
        at(
            text,
            path,
            offset,
            if key == "." { String::new() } else { key },
            message,
        )
    })?;
    let kinds: Vec<&str> = modules.kinds().collect();
    let watched = tls::watched(&file, path);
    // Stamped before validation reads them: a file renewed while it is
    // read is seen as changed by the watch, never missed.
    let read_as = watched
        .iter()
        .filter_map(|p| Some((p.clone(), FileStamp::of(p)?)))
        .collect();
    let mut plan = validate::validate(file, path, &kinds, running).map_err(|e| {
        let offset = locate::offset_of(text, &e.path);
        at(text, path, offset, error::path_string(&e.path), e.message)
    })?;
    plan.origin = Origin {
        text: text.into(),
        watched,
        read_as,
    };
    Ok(plan)
}

fn at(text: &str, path: &Path, offset: Option<usize>, key: String, message: String) -> ConfigError {
    let (line, column) = offset.map_or((0, 0), |o| locate::line_col(text, o));
    ConfigError {
        file: path.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

/// "invalid TOML" and the character at `offset`, for an error the parser
/// gave no message.
fn syntax_error_at(text: &str, offset: Option<usize>) -> String {
    let next = offset
        .and_then(|o| text.get(o..))
        .and_then(|rest| rest.chars().next());
    match next {
        Some(c) => format!("invalid TOML: unexpected character {c:?}"),
        None => "invalid TOML: unexpected end of file".to_string(),
    }
}

/// serde_path_to_error writes `listener[0].bind`; turn it back into segments.
fn parse_serde_path(s: &str) -> Vec<error::Seg> {
    let mut segs = Vec::new();
    for part in s.split('.') {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            if b > 0 {
                segs.push(error::Seg::Key(rest[..b].to_string()));
            }
            rest = &rest[b..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let end = stripped.find(']').unwrap_or(stripped.len());
                if let Ok(i) = stripped[..end].parse() {
                    segs.push(error::Seg::Index(i));
                }
                rest = stripped.get(end + 1..).unwrap_or("");
            }
        } else if !rest.is_empty() {
            segs.push(error::Seg::Key(rest.to_string()));
        }
    }
    segs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TOML parser reports a NUL in a comment with an empty message;
    /// found by the `config` fuzz target.
    #[test]
    fn a_syntax_error_without_words_still_says_what_is_wrong() {
        let e = parse("# a comment \0 with a NUL\n", Path::new("f.toml")).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("unexpected character '\\0'"), "{e}");
    }

    /// The log filter parser panics on some non-ASCII directives; `check`
    /// refuses them first. Found by the `config` fuzz target.
    #[test]
    fn a_non_ascii_log_level_is_an_error_not_a_panic() {
        let text = "[global]\nlog_level = \"x, ӓ=info\"\n";
        let e = parse(text, Path::new("f.toml")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "global.log_level"), "{e}");
        assert!(e.message.contains("unexpected character 'ӓ'"), "{e}");
    }

    /// A span field value in `log_level` is matched literally: compiled
    /// as a regular expression this one took over 2 GB. Found by the
    /// `config` fuzz target.
    #[test]
    fn a_log_level_field_filter_is_cheap() {
        let dots = ".".repeat(120);
        let text = format!("[global]\nlog_level = \"[{{b=0x35>>>>{dots}>path>>]>> !8a}}da\"\n");
        // Refused at once, and for what it is; the test used to run for
        // many seconds and gigabytes before reaching an answer.
        let e = parse(&text, Path::new("f.toml")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "global.log_level"), "{e}");
        crate::logging::filter("info,[conn{peer=10.0.0.1}]=debug")
            .expect("a span field filter is accepted");
    }
}
