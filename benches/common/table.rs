//! Markdown tables and the small numeric helpers behind them, shared by
//! the benches.

/// Median of `samples` (not empty).
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The `p`-th percentile (0–100) of `samples` (not empty), nearest rank:
/// the smallest sample with at least p % of the samples at or below it.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn format_value(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) => format!("{v:.decimals$}"),
        None => "n/a".into(),
    }
}

pub fn format_ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d != 0.0 => format!("{:.2}", n / d),
        _ => "n/a".into(),
    }
}

/// Renders rows as a markdown table with padded columns, so it reads well
/// in a terminal as well as rendered.
pub fn markdown(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let pad = |row: &Vec<String>| {
        row.iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, &w))| {
                let fill = " ".repeat(w - cell.chars().count());
                // Numbers right-aligned, the figure names left-aligned.
                if i == 0 {
                    format!("{cell}{fill}")
                } else {
                    format!("{fill}{cell}")
                }
            })
            .collect::<Vec<_>>()
    };
    let mut out = line(pad(&rows[0]));
    let rule = widths
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            if i == 0 {
                "-".repeat(w)
            } else {
                format!("{}:", "-".repeat(w.saturating_sub(1)))
            }
        })
        .collect();
    out.push_str(&line(rule));
    for row in &rows[1..] {
        out.push_str(&line(pad(row)));
    }
    out
}
