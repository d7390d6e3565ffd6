//! The status page: HTML made from the `/status` document, with its
//! style and a small refresh script inline, so that it loads nothing
//! from anywhere (the admin listener sends a Content-Security-Policy
//! that forbids it). Every value from the document is escaped.
//!
//! A pool with many backends is collapsed under a per-pool summary, so a
//! thousand backends stay readable; modules show counts only.

use std::fmt::Write;

use serde_json::Value;

/// Pools with more backends than this start collapsed.
const OPEN_UP_TO: usize = 50;

/// Sent with the page: nothing may be loaded, only the inline style and
/// script run, and the script may only fetch from the admin listener.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     script-src 'unsafe-inline'; connect-src 'self'; img-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.3em 0 .8em}
th,td{border:1px solid #ccc;padding:.15em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.9em;word-break:break-all}
tr.down td{background:#fde0e0}tr.resting td{background:#fff4d6}
tr.expiring td{background:#fff0c0}tr.expired td{background:#f8c8c8}
.bad{color:#b00020;font-weight:bold}.ok{color:#157f1f}.muted{color:#777}
summary{cursor:pointer;padding:.2em 0}details{margin:.2em 0 .6em}
header p{margin:.15em 0}
";

/// Reload the page every 10 s while the box is ticked, keeping which
/// pools are open; marks the document so that a test can see it ran.
const SCRIPT: &str = r#"
(function () {
  var root = document.documentElement;
  root.setAttribute("data-script", "ran");
  var key = "fleetgate-status-open";
  var saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(key) || "null"); } catch (e) {}
  var all = document.querySelectorAll("details[id]");
  for (var i = 0; i < all.length; i++) {
    if (saved && Object.prototype.hasOwnProperty.call(saved, all[i].id)) {
      all[i].open = saved[all[i].id];
    }
  }
  var box = document.getElementById("auto");
  setInterval(function () {
    if (!box || !box.checked) { return; }
    var open = {};
    var d = document.querySelectorAll("details[id]");
    for (var j = 0; j < d.length; j++) { open[d[j].id] = d[j].open; }
    try { sessionStorage.setItem(key, JSON.stringify(open)); } catch (e) {}
    location.reload();
  }, 10000);
})();
"#;

/// `s` with the five HTML-special characters escaped, for text and
/// quoted attribute values alike.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as text: strings bare, null as a dash.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn t(v: &Value) -> String {
    esc(&text(v))
}

/// Unix seconds as UTC, to the second.
fn time(v: &Value) -> String {
    match v.as_f64() {
        Some(secs) if secs >= 0.0 => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
            humantime::format_rfc3339_seconds(at).to_string()
        }
        _ => "—".into(),
    }
}

fn age(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.1} s ago")
    } else if secs < 7200.0 {
        format!("{:.0} min ago", secs / 60.0)
    } else {
        format!("{:.1} h ago", secs / 3600.0)
    }
}

pub fn render(doc: &Value) -> String {
    let mut h = String::with_capacity(64 * 1024);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width\">");
    h.push_str("<title>fleetgate status</title><style>");
    h.push_str(STYLE);
    h.push_str("</style></head><body>");
    header(&mut h, doc);
    listeners(&mut h, doc);
    pools(&mut h, doc);
    nodes(&mut h, doc);
    certificates(&mut h, doc);
    modules(&mut h, doc);
    h.push_str("<script>");
    h.push_str(SCRIPT);
    h.push_str("</script></body></html>\n");
    h
}

fn header(h: &mut String, doc: &Value) {
    let _ = write!(
        h,
        "<header><h1>fleetgate {}</h1><p>Configuration <code id=\"config\">{}</code>, loaded {}.</p>",
        t(&doc["version"]),
        t(&doc["config"]),
        time(&doc["config_loaded_at"]),
    );
    match doc["last_reload"].as_object() {
        None => h.push_str("<p id=\"reload\">No reload since start.</p>"),
        Some(r) if r["result"] == "ok" => {
            let _ = write!(
                h,
                "<p id=\"reload\">Last reload {}: <span class=\"ok\">ok</span>.</p>",
                time(&r["at"])
            );
        }
        Some(r) => {
            let _ = write!(
                h,
                "<p id=\"reload\">Last reload {}: <span class=\"bad\">error</span>: {} (the previous configuration runs).</p>",
                time(&r["at"]),
                t(&r["error"])
            );
        }
    }
    let _ = write!(
        h,
        "<p>{} open connections. Page made {}. <label><input type=\"checkbox\" id=\"auto\" checked> refresh every 10 s</label> · <a href=\"status\">JSON</a> · <a href=\"metrics\">metrics</a></p></header>",
        t(&doc["open_connections"]),
        time(&doc["generated_at"]),
    );
}

fn listeners(h: &mut String, doc: &Value) {
    h.push_str("<section id=\"listeners\"><h2>Listeners</h2><table><tr><th>Name</th><th>Mode</th><th>Bind</th><th>Pools</th><th>Open connections</th><th>Connections/s</th><th>Requests/s</th><th>Connections</th><th>Requests</th></tr>");
    for l in doc["listeners"].as_array().into_iter().flatten() {
        let pools: Vec<String> = l["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        let requests = if l["mode"] == "offload" {
            (t(&l["requests_per_second"]), t(&l["requests_total"]))
        } else {
            ("—".into(), "—".into())
        };
        let _ = write!(
            h,
            "<tr data-listener=\"{name}\"><td>{name}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            t(&l["mode"]),
            t(&l["bind"]),
            esc(&pools.join(", ")),
            t(&l["open_connections"]),
            t(&l["connections_per_second"]),
            requests.0,
            t(&l["connections_total"]),
            requests.1,
            name = t(&l["name"]),
        );
    }
    h.push_str("</table></section>");
}

fn pools(h: &mut String, doc: &Value) {
    h.push_str("<section id=\"pools\"><h2>Pools and backends</h2>");
    for p in doc["pools"].as_array().into_iter().flatten() {
        let backends = p["backends"].as_array().map_or(&[][..], Vec::as_slice);
        let up = backends.iter().filter(|b| b["up"] == true).count();
        let resting = backends.iter().filter(|b| b["role"] == "resting").count();
        let down = backends.len() - up;
        let open: u64 = backends
            .iter()
            .filter_map(|b| b["active_connections"].as_u64())
            .sum();
        let name = t(&p["name"]);
        let _ = write!(
            h,
            "<details id=\"pool-{name}\"{}><summary><b>{name}</b>: {} backends, {up} up, {}{resting} resting; {open} open connections; {}{}{}</summary>",
            if backends.len() <= OPEN_UP_TO { " open" } else { "" },
            backends.len(),
            if down > 0 {
                format!("<span class=\"bad\">{down} down</span>, ")
            } else {
                "0 down, ".into()
            },
            t(&p["algorithm"]),
            p["health_check"]
                .as_str()
                .map_or_else(|| ", no health check".to_string(), |c| format!(", health check {}", esc(c))),
            p["discovery_service"]
                .as_str()
                .map_or_else(String::new, |s| format!(", discovery service <code>{}</code>", esc(s))),
        );
        h.push_str("<table><tr><th>Backend</th><th>State</th><th>Reason</th><th>Role</th><th>Weight</th><th>Open</th><th>Last health check</th><th>Node</th></tr>");
        for b in backends {
            backend(h, b);
        }
        h.push_str("</table></details>");
    }
    h.push_str("</section>");
}

fn backend(h: &mut String, b: &Value) {
    let class = if b["up"] != true {
        "down"
    } else if b["role"] == "resting" {
        "resting"
    } else {
        "up"
    };
    let state = if b["up"] == true { "up" } else { "down" };
    let check = match b["last_check"].as_object() {
        None => "—".to_string(),
        Some(c) => {
            let ago = c["seconds_ago"].as_f64().map_or_else(String::new, age);
            if c["ok"] == true {
                format!("<span class=\"ok\">ok</span> {ago}")
            } else {
                format!(
                    "<span class=\"bad\">failed</span> {ago}: {}",
                    t(&c["error"])
                )
            }
        }
    };
    let node = match b["node"].as_str() {
        Some(n) => format!("{} ({})", esc(n), t(&b["node_state"])),
        None => "—".into(),
    };
    let _ = write!(
        h,
        "<tr class=\"{class}\" data-backend=\"{addr}\" data-state=\"{state}\"><td><code>{addr}</code></td><td>{state}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{check}</td><td>{node}</td></tr>",
        t(&b["reason"]),
        t(&b["role"]),
        t(&b["weight"]),
        t(&b["active_connections"]),
        addr = t(&b["address"]),
    );
}

fn nodes(h: &mut String, doc: &Value) {
    h.push_str("<section id=\"nodes\"><h2>Discovered nodes</h2>");
    let Some(d) = doc["discovery"].as_object() else {
        h.push_str("<p class=\"muted\">Discovery is not configured.</p></section>");
        return;
    };
    let nodes = d["nodes"].as_array().map_or(&[][..], Vec::as_slice);
    let _ = write!(
        h,
        "<p>Heartbeats on <code>{}</code>: {} nodes.</p>",
        t(&d["listening"]),
        nodes.len()
    );
    h.push_str("<table><tr><th>Node</th><th>Address</th><th>State</th><th>Heartbeat</th><th>Weight</th><th>Load</th><th>Services</th></tr>");
    for n in nodes {
        let services: Vec<String> = n["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{}:{}{}",
                    text(&s["name"]),
                    text(&s["port"]),
                    if s["tls"] == true { " (tls)" } else { "" }
                )
            })
            .collect();
        let state = t(&n["state"]);
        let _ = write!(
            h,
            "<tr class=\"{}\" data-node=\"{id}\"><td>{id}</td><td><code>{}</code></td><td>{state}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            if state == "normal" { "up" } else { "resting" },
            t(&n["address"]),
            n["seconds_since_heartbeat"].as_f64().map_or_else(String::new, age),
            t(&n["weight"]),
            t(&n["load"]),
            esc(&services.join(", ")),
            id = t(&n["id"]),
        );
    }
    h.push_str("</table></section>");
}

fn certificates(h: &mut String, doc: &Value) {
    let _ = write!(
        h,
        "<section id=\"certificates\"><h2>Certificates</h2><p class=\"muted\">Highlighted: expired, or fewer than {} days left.</p>",
        t(&doc["certificate_warn_days"])
    );
    h.push_str("<table><tr><th>Used by</th><th>Role</th><th>Subject</th><th>SANs</th><th>SHA-256 fingerprint</th><th>Not after</th><th>Days left</th></tr>");
    for c in doc["certificates"].as_array().into_iter().flatten() {
        let class = if c["expired"] == true {
            "expired"
        } else if c["expiring"] == true {
            "expiring"
        } else {
            "valid"
        };
        let used_by = match c["pool"].as_str() {
            Some(p) if !p.is_empty() => format!("pool {}", esc(p)),
            _ => format!("listener {}", t(&c["listener"])),
        };
        let sans: Vec<String> = c["sans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        let _ = write!(
            h,
            "<tr class=\"{class}\" data-fingerprint=\"{fp}\"><td>{used_by}</td><td>{} <span class=\"muted\">({})</span></td><td>{}</td><td>{}</td><td><code>{fp}</code></td><td>{}</td><td class=\"n\">{}</td></tr>",
            t(&c["role"]),
            t(&c["origin"]),
            t(&c["subject"]),
            esc(&sans.join(", ")),
            time(&c["not_after"]),
            t(&c["days_left"]),
            fp = t(&c["fingerprint"]),
        );
    }
    h.push_str("</table></section>");
}

fn modules(h: &mut String, doc: &Value) {
    h.push_str("<section id=\"modules\"><h2>Modules</h2>");
    let modules = doc["modules"].as_array().map_or(&[][..], Vec::as_slice);
    if modules.is_empty() {
        h.push_str("<p class=\"muted\">No modules.</p></section>");
        return;
    }
    h.push_str("<table><tr><th>Name</th><th>Kind</th><th>Ready</th><th>Status</th></tr>");
    for m in modules {
        // A required module that is not ready makes `/healthz` fail.
        let (class, ready) = match m["ready"].as_bool() {
            Some(false) => (
                if m["required"] == false {
                    ""
                } else {
                    " class=\"down\""
                },
                format!(
                    "<span class=\"bad\">no: {}</span>",
                    t(&m["not_ready_reason"])
                ),
            ),
            _ => ("", "<span class=\"ok\">yes</span>".to_string()),
        };
        let status = match m["status"].as_object() {
            None => "—".to_string(),
            Some(o) => o
                .iter()
                .map(|(k, v)| format!("{}: <b>{}</b>", esc(&k.replace('_', " ")), t(v)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let _ = write!(
            h,
            "<tr data-module=\"{name}\"{class}><td>{name}</td><td>{}</td><td>{ready}</td><td>{status}</td></tr>",
            t(&m["kind"]),
            name = t(&m["name"]),
        );
    }
    h.push_str("</table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_every_value() {
        let doc = json!({
            "version": "1",
            "config": "/etc/<x>.toml",
            "listeners": [{"name": "a\"><script>alert(1)</script>", "mode": "tcp", "bind": "1", "pools": ["p&q"]}],
            "pools": [{"name": "p'x", "algorithm": "R", "backends": [{"address": "<u>", "up": false, "reason": "x<y", "role": "primary"}]}],
            "certificates": [{"listener": "<l>", "pool": "", "subject": "CN=<evil>", "sans": ["DNS:<a>"], "fingerprint": "ab", "expiring": true}],
            "modules": [
                {"name": "m<", "kind": "k", "status": {"a<": "<v>"}, "ready": true},
                {"name": "n", "kind": "k", "ready": false, "required": true, "not_ready_reason": "<r>"},
            ],
        });
        let page = render(&doc);
        // The only tags are the page's own.
        assert!(!page.contains("<script>alert"));
        for raw in ["<evil>", "<u>", "<x>", "<l>", "<v>", "<a>", "x<y", "<r>"] {
            assert!(!page.contains(raw), "{raw} unescaped");
        }
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("pool-p&#39;x"));
        assert!(page.contains("class=\"expiring\""));
        assert!(page.contains("class=\"down\""));
        assert!(page.contains("<tr data-module=\"n\" class=\"down\">"));
        assert!(page.contains("no: &lt;r&gt;"));
    }
}
