//! `fleetgate check`: every broken configuration exits 1 and points at the
//! exact `FILE:LINE:COL` and key path; the shipped configurations pass.
//!
//! Each case marks the spot the error must point at with `‸`; the marker
//! is removed before the file is written, and the expected line and column
//! (1-based, counted in characters) are computed from where it stood.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MARK: char = '‸';

fn fleetgate_check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("check")
        .arg("-c")
        .arg(path)
        .output()
        .expect("run fleetgate check")
}

/// Strip the marker; return the text and the marker's 1-based line and
/// column in characters.
fn unmark(marked: &str) -> (String, usize, usize) {
    let at = marked
        .find(MARK)
        .expect("every case marks the error position");
    assert_eq!(marked.matches(MARK).count(), 1, "one marker per case");
    let before = &marked[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (marked.replacen(MARK, "", 1), line, column)
}

/// A broken config: `key` is the key path the error must name (None for
/// TOML syntax errors, which have no key), `says` a piece of the message.
struct Case {
    name: &'static str,
    text: &'static str,
    key: Option<&'static str>,
    says: &'static str,
}

fn run_case(dir: &Path, case: &Case) -> Result<(), String> {
    let (text, line, column) = unmark(case.text);
    let path = dir.join(format!("{}.toml", case.name));
    std::fs::write(&path, &text).unwrap();
    let out = fleetgate_check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.code() != Some(1) {
        problems.push(format!("exit status {:?}, want 1", out.status.code()));
    }
    if stdout.contains("ok") {
        problems.push(format!("stdout says ok: {stdout:?}"));
    }
    let want = match case.key {
        Some(key) => format!("{}:{line}:{column}: key `{key}`: ", path.display()),
        None => format!("{}:{line}:{column}: ", path.display()),
    };
    let first = stderr.lines().next().unwrap_or("");
    if !first.starts_with(&want) {
        problems.push(format!(
            "first stderr line {first:?} does not start with {want:?}"
        ));
    }
    if case.key.is_none()
        && first
            .strip_prefix(&want)
            .is_some_and(|r| r.starts_with("key `"))
    {
        problems.push(format!("a syntax error names a key: {first:?}"));
    }
    if !stderr.contains(case.says) {
        problems.push(format!("stderr does not say {:?}", case.says));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "case `{}`:\n  {}\n  stderr: {stderr}",
            case.name,
            problems.join("\n  ")
        ))
    }
}

fn run_cases(cases: &[Case]) {
    let dir = tempfile::tempdir().unwrap();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| run_case(dir.path(), c).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn shape_errors_point_at_the_key() {
    run_cases(&[
        Case {
            name: "unknown_listener_key",
            text: r#"[admin]
bind = "127.0.0.1:9901"

[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
‸colour = "red"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].colour"),
            says: "unknown field `colour`",
        },
        Case {
            name: "unknown_key_in_inline_backend",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }, { address = "127.0.0.1:7101", ‸wieght = 2 }]
"#,
            key: Some("pool[0].backends[1].wieght"),
            says: "unknown field `wieght`",
        },
        Case {
            name: "unknown_top_level_table",
            text: r#"[global]
log_level = "info"

[‸frontend]
bind = "127.0.0.1:7001"
"#,
            key: Some("frontend"),
            says: "unknown field `frontend`",
        },
        Case {
            name: "wrong_type",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
max_connections = ‸"many"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].max_connections"),
            says: "invalid type",
        },
        Case {
            name: "negative_count",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
retries = ‸-1
"#,
            key: Some("pool[0].retries"),
            says: "-1",
        },
        Case {
            name: "bad_duration",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
idle_timeout = ‸"10 parsecs"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].idle_timeout"),
            says: "invalid duration \"10 parsecs\"",
        },
        Case {
            name: "duration_as_number",
            text: r#"[global]
drain_timeout = ‸5

[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("global.drain_timeout"),
            says: "expected a duration string",
        },
        Case {
            name: "unknown_algorithm",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
algorithm = ‸"random"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("pool[0].algorithm"),
            says: "unknown variant `random`",
        },
        Case {
            name: "unknown_mode",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
mode = ‸"udp"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].mode"),
            says: "unknown variant `udp`",
        },
        Case {
            name: "unknown_check_kind_in_sub_table",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]

[[pool]]
name = "q"
backends = [{ address = "127.0.0.1:7101" }]
[pool.health_check]
kind = ‸"smtp"
"#,
            key: Some("pool[1].health_check.kind"),
            says: "unknown variant `smtp`",
        },
        Case {
            name: "missing_key_in_inline_table",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }, ‸{ weight = 2 }]
"#,
            key: Some("pool[0].backends[1]"),
            says: "missing field `address`",
        },
        Case {
            name: "whole_value_wrong_type",
            text: r#"[[pool]]
name = "p"
backends = ‸"127.0.0.1:7100"
"#,
            key: Some("pool[0].backends"),
            says: "expected a sequence",
        },
        Case {
            name: "missing_required_key",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]

‸[[listener]]
name = "a"
pool = "p"
"#,
            key: Some("listener[0]"),
            says: "missing field `bind`",
        },
    ]);
}

#[test]
fn syntax_errors_point_at_the_position() {
    run_cases(&[
        Case {
            name: "missing_equals",
            text: r#"[[listener]]
name = "a"
bind ‸"127.0.0.1:7001"
"#,
            key: None,
            says: "expected",
        },
        Case {
            name: "bad_table_header",
            text: r#"[global]
log_level = "info"
[[listener‸]
name = "a"
"#,
            key: None,
            says: "invalid table header",
        },
        Case {
            name: "duplicate_key",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
‸pool = "q"
"#,
            key: None,
            says: "duplicate key `pool`",
        },
        Case {
            name: "garbage_after_value",
            text: r#"[[listener]]
name = "a" ‸bind = "127.0.0.1:7001"
"#,
            key: None,
            says: "expected newline",
        },
    ]);
}

#[test]
fn semantic_errors_point_at_the_key() {
    run_cases(&[
        Case {
            name: "bad_backend_address",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }, { address = ‸"localhost" }]
"#,
            key: Some("pool[0].backends[1].address"),
            says: "\"localhost\" is not an IP address with a port",
        },
        Case {
            name: "bind_without_port",
            text: r#"[[listener]]
name = "a"
bind = ‸"127.0.0.1"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].bind"),
            says: "is not an IP address with a port",
        },
        Case {
            name: "bad_admin_bind",
            text: r#"[admin]
bind = ‸"127.0.0.1:99999"
"#,
            key: Some("admin.bind"),
            says: "is not an IP address with a port",
        },
        Case {
            name: "listener_names_missing_pool",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[listener]]
name = "b"
bind = "127.0.0.1:7002"
pool = ‸"q"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[1].pool"),
            says: "no pool named \"q\"",
        },
        Case {
            name: "duplicate_listener_name",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[listener]]
name = ‸"a"
bind = "127.0.0.1:7002"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[1].name"),
            says: "duplicate listener name \"a\"",
        },
        Case {
            name: "duplicate_pool_name",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]

[[pool]]
name = ‸"p"
backends = [{ address = "127.0.0.1:7101" }]
"#,
            key: Some("pool[1].name"),
            says: "duplicate pool name \"p\"",
        },
        Case {
            name: "two_listeners_one_address",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[listener]]
name = "b"
bind = ‸"127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[1].bind"),
            says: "already bound by listener \"a\"",
        },
        Case {
            name: "two_inline_listeners_one_address",
            text: r#"listener = [
  { name = "a", bind = "127.0.0.1:7001", pool = "p" },
  { name = "b", bind = ‸"127.0.0.1:7001", pool = "p" },
]

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[1].bind"),
            says: "already bound by listener \"a\"",
        },
        Case {
            name: "listener_on_admin_address",
            text: r#"[admin]
bind = "127.0.0.1:7001"

[[listener]]
name = "a"
bind = ‸"127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].bind"),
            says: "is the admin address",
        },
        Case {
            name: "bad_cidr_in_deny",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
allow = ["10.0.0.0/8"]
deny = ["10.1.0.0/16", ‸"300.1.0.0/16"]

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].deny[1]"),
            says: "\"300.1.0.0/16\" is not an IP address or CIDR network",
        },
        Case {
            name: "bad_prefix_in_allow",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[listener]]
name = "b"
bind = "127.0.0.1:7002"
pool = "p"
allow = [‸"10.0.0.0/33"]

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[1].allow[0]"),
            says: "\"10.0.0.0/33\" is not an IP address or CIDR network",
        },
        Case {
            name: "weight_zero",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [
  { address = "127.0.0.1:7100" },
  { address = "127.0.0.1:7101", weight = ‸0 },
]
"#,
            key: Some("pool[0].backends[1].weight"),
            says: "weight must be between 1 and 1000, got 0",
        },
        Case {
            name: "weight_too_large",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100", weight = ‸1001 }]
"#,
            key: Some("pool[0].backends[0].weight"),
            says: "got 1001",
        },
        Case {
            name: "backend_listed_twice",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }, { address = ‸"127.0.0.1:7100" }]
"#,
            key: Some("pool[0].backends[1].address"),
            says: "listed twice",
        },
        Case {
            name: "offload_hello_max_bytes_too_small",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
mode = "offload"
pool = "p"
tls = { cert = "auto" }
hello_max_bytes = ‸1024

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].hello_max_bytes"),
            says: "hello_max_bytes must be at least 4096 on offload listeners",
        },
        Case {
            name: "pool_without_backends",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"

[[pool]]
name = "x"
backends = [{ address = "127.0.0.1:7100" }]

‸[[pool]]
name = "p"
max_fails = 2
"#,
            key: Some("pool[1].backends"),
            says: "pool \"p\" has no backends",
        },
        Case {
            name: "zero_idle_timeout",
            text: r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
idle_timeout = ‸"0s"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[0].idle_timeout"),
            says: "greater than zero",
        },
        Case {
            name: "zero_max_fails",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
max_fails = ‸0
"#,
            key: Some("pool[0].max_fails"),
            says: "max_fails must be at least 1",
        },
        Case {
            name: "health_check_rise_zero_in_sub_table",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
[pool.health_check]
kind = "http"
rise = ‸0
"#,
            key: Some("pool[0].health_check.rise"),
            says: "rise must be at least 1",
        },
        Case {
            name: "dotted_keys",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
health_check.kind = "http"
health_check.rise = ‸0
"#,
            key: Some("pool[0].health_check.rise"),
            says: "rise must be at least 1",
        },
        Case {
            name: "duplicate_name_in_inline_listeners",
            text: r#"listener = [{ name = "a", bind = "127.0.0.1:7001", pool = "p" }, { name = ‸"a", bind = "127.0.0.1:7002", pool = "p" }]

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
"#,
            key: Some("listener[1].name"),
            says: "duplicate listener name \"a\"",
        },
        Case {
            name: "tab_indented_key",
            text: "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:7001\"\n\tpool = ‸\"q\"\n\n[[pool]]\nname = \"p\"\nbackends = [{ address = \"127.0.0.1:7100\" }]\n",
            key: Some("listener[0].pool"),
            says: "no pool named \"q\"",
        },
        Case {
            name: "bad_log_level",
            text: r#"[global]
log_level = ‸"loud=="
"#,
            key: Some("global.log_level"),
            says: "invalid log level",
        },
        Case {
            name: "cpu_affinity_word",
            text: r#"[global]
cpu_affinity = ‸"all"
"#,
            key: Some("global.cpu_affinity"),
            says: "expected \"auto\", \"off\", or a list of CPU numbers",
        },
        Case {
            name: "cpu_affinity_missing_cpu",
            text: r#"[global]
cpu_affinity = ‸[0, 4096]
"#,
            key: Some("global.cpu_affinity"),
            says: "CPU 4096 is not available to this process",
        },
        Case {
            name: "crlf_line_endings",
            text: "[[listener]]\r\nname = \"a\"\r\nbind = \"127.0.0.1:7001\"\r\npool = ‸\"q\"\r\n\r\n[[pool]]\r\nname = \"p\"\r\nbackends = [{ address = \"127.0.0.1:7100\" }]\r\n",
            key: Some("listener[0].pool"),
            says: "no pool named \"q\"",
        },
    ]);
}

/// Columns count characters, as the TOML parser's own messages and editors
/// do, not bytes: a non-ASCII character earlier on the line must not push
/// the column to the right.
#[test]
fn columns_count_characters_not_bytes() {
    run_cases(&[
        Case {
            name: "non_ascii_before_semantic_error",
            text: r#"[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
health_check = { kind = "http", host = "ümlaut.example", path = ‸"x" }
"#,
            key: Some("pool[0].health_check.path"),
            says: "path must start with '/'",
        },
        Case {
            name: "non_ascii_before_shape_error",
            text: r#"[[pool]]
name = "ümlaut-ünits"
backends = [{ address = "127.0.0.1:7100" }]
health_check = { kind = "http", host = "ü.example", interval = ‸"2 fortnights" }
"#,
            key: Some("pool[0].health_check.interval"),
            says: "invalid duration",
        },
        Case {
            name: "non_ascii_before_syntax_error",
            text: "[[listener]]\nname = \"ü\"  ‸bind = \"127.0.0.1:7001\"\n",
            key: None,
            says: "expected newline",
        },
    ]);
}

#[test]
fn unreadable_file_exits_1_without_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let out = fleetgate_check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("{}: cannot read the file", path.display())),
        "{stderr}"
    );
}

fn shipped_configs() -> Vec<PathBuf> {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        // agent.toml is the sidecar's file, not the balancer's.
        .filter(|p| !p.ends_with("agent.toml"))
        .collect();
    found.sort();
    found
}

/// The offload example names certificate files an operator supplies; put
/// real ones beside a copy of it so `check` judges the file itself.
fn offload_example_with_certificates(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["ums.example.com".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("server-chain.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("device-ca.pem"), ca.pem()).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/offload.toml");
    let dst = dir.join("offload.toml");
    std::fs::copy(src, &dst).unwrap();
    dst
}

#[test]
fn shipped_configs_are_ok() {
    let dir = tempfile::tempdir().unwrap();
    let mut configs = shipped_configs();
    let offload = offload_example_with_certificates(dir.path());
    for c in configs.iter_mut() {
        if c.ends_with("offload.toml") {
            *c = offload.clone();
        }
    }
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/fleetgate.toml");
    assert!(configs.contains(&default), "conf/fleetgate.toml is missing");
    let failures: Vec<String> = configs
        .iter()
        .filter_map(|path| {
            let out = fleetgate_check(path);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            (out.status.code() != Some(0) || !only_ok(&stdout) || !stderr.is_empty()).then(|| {
                format!(
                    "{}: exit {:?}, stdout {stdout:?}, stderr {stderr:?}",
                    path.display(),
                    out.status.code()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "shipped configs that `fleetgate check` refuses:\n{}",
        failures.join("\n")
    );
}

/// Without `-c`, `check` reads conf/fleetgate.toml from the working
/// directory, as documented.
#[test]
fn check_defaults_to_conf_fleetgate_toml() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("check")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(only_ok(&stdout), "{stdout:?}");
}

/// `ok`, then at most the list of what a first start will create.
fn only_ok(stdout: &str) -> bool {
    match stdout.strip_prefix("ok\n") {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix("will create on first start:\n")
            .is_some_and(|list| list.lines().all(|l| l.starts_with("  "))),
        None => false,
    }
}

/// The files and directories under `dir`, relative to it, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            found.push(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    found.sort();
    found
}

/// `check` on the shipped default configuration, copied into an empty
/// directory, writes nothing (its data directory, certificate and device
/// CA are made by the first `run`) and names what that first start will
/// create.
#[test]
fn check_writes_nothing_and_names_what_a_first_start_creates() {
    let dir = tempfile::tempdir().unwrap();
    // `data_dir = "../data"`: beside `conf/`, so inside the directory too.
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let config = dir.path().join("conf/fleetgate.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/fleetgate.toml"),
        &config,
    )
    .unwrap();
    let out = fleetgate_check(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        tree(dir.path()),
        [PathBuf::from("conf"), PathBuf::from("conf/fleetgate.toml")],
        "check created files"
    );
    assert!(only_ok(&stdout), "{stdout:?}");
    let data = dir.path().join("conf/../data");
    let named = |file: &str| {
        let path = data.join(file).display().to_string();
        stdout.lines().any(|l| l.contains(&path))
    };
    for file in [
        "server.pem",
        "server.key",
        "devices/device-ca.pem",
        "devices/device-ca.key",
    ] {
        assert!(named(file), "{file} is not named in {stdout:?}");
    }
    // Run again: the same list, still nothing on disk.
    let again = fleetgate_check(&config);
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(tree(dir.path()).len(), 2);
}

/// A config using every key, to show the checker accepts what the
/// schema documents (and so that each broken case above differs from a
/// valid file by the one mistake it names).
#[test]
fn full_valid_config_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.toml");
    std::fs::write(
        &path,
        r#"[global]
log_level = "warn"
drain_timeout = "5s"
worker_threads = 2

[admin]
bind = "127.0.0.1:9901"

[[listener]]
name = "a"
bind = "127.0.0.1:7001"
mode = "tcp"
pool = "p"
max_connections = 100
idle_timeout = "1m30s"
allow = ["10.0.0.0/8", "127.0.0.1", "::1/128"]
deny = ["10.1.0.0/16"]
reuse_port = true
backlog = 128
nodelay = false
keepalive = false
splice = false

[[listener]]
name = "b"
bind = "[::1]:7002"
pool = "q"

[[pool]]
name = "p"
algorithm = "weighted_round_robin"
backends = [
  { address = "127.0.0.1:7100", weight = 1000 },
  { address = "[::1]:7101", weight = 1, backup = true },
]
max_fails = 3
fail_timeout = "10s"
connect_timeout = "500ms"
retries = 0

[[pool]]
name = "q"
algorithm = "hash_client_ip"
backends = [{ address = "127.0.0.1:7102" }]
[pool.health_check]
kind = "http"
path = "/health"
expect = 204
host = "ums.example"
interval = "2s"
timeout = "1s"
rise = 1
fall = 1
"#,
    )
    .unwrap();
    let out = fleetgate_check(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

/// `fleetgate check | head -1`, or any reader that goes away early: the
/// verdict still comes from the exit status, with no panic on the closed
/// pipe.
#[test]
fn a_closed_output_pipe_does_not_make_check_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["check", "-c"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/fleetgate.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the configuration is read and the verdict written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
