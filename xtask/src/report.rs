//! Writers for the benchmark matrix: `bench.json` (every measurement), `bench.csv` (the same,
//! one row each) and one SVG line plot per (backend, dtype, phase): milliseconds against
//! the sequence length (log scale), one line per series.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use crate::bench::Measurement;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// Writes `bench.json`, `bench.csv` and the plots into `out` (created if missing).
pub fn write_all(out: &Path, results: &[Measurement]) -> Result<(), String> {
    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let write = |name: &str, text: String| {
        let path = out.join(name);
        fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    let json = serde_json::to_string_pretty(results).map_err(|e| e.to_string())?;
    write("bench.json", json + "\n")?;
    write("bench.csv", csv(results))?;
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&Measurement>> = BTreeMap::new();
    for m in results {
        groups
            .entry((&m.backend, &m.dtype, &m.phase))
            .or_default()
            .push(m);
    }
    for ((backend, dtype, phase), group) in groups {
        let title = format!("NSA {phase}, {backend}, {dtype}: median ms");
        write(
            &format!("bench-{backend}-{dtype}-{phase}.svg"),
            plot(&title, &group),
        )?;
    }
    Ok(())
}

/// `backend,dtype,phase,seq_len,series,ms`, one row per measurement.
fn csv(results: &[Measurement]) -> String {
    let mut text = String::from("backend,dtype,phase,seq_len,series,ms\n");
    for m in results {
        let _ = writeln!(
            text,
            "{},{},{},{},\"{}\",{}",
            m.backend, m.dtype, m.phase, m.seq_len, m.series, m.ms
        );
    }
    text
}

/// An SVG line plot of one group: x the sequence length on a log scale, y milliseconds from 0.
fn plot(title: &str, group: &[&Measurement]) -> String {
    let mut series: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
    for m in group {
        series.entry(&m.series).or_default().push((m.seq_len, m.ms));
    }
    let mut lengths: Vec<usize> = group.iter().map(|m| m.seq_len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let (x_min, x_max) = (
        (lengths[0] as f64).log2(),
        (lengths[lengths.len() - 1] as f64).log2(),
    );
    let y_max = group.iter().map(|m| m.ms).fold(0.0, f64::max).max(1e-9) * 1.1;
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let x = |len: usize| {
        let span = (x_max - x_min).max(1e-9);
        MARGIN_LEFT + ((len as f64).log2() - x_min) / span * plot_w
    };
    let y = |ms: f64| MARGIN_TOP + plot_h * (1.0 - ms / y_max);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>"#,
        WIDTH / 2.0
    );
    // Axes, x ticks at the measured lengths, five y ticks.
    let (x0, y0) = (MARGIN_LEFT, MARGIN_TOP + plot_h);
    let _ = writeln!(
        svg,
        r#"<path d="M{x0} {MARGIN_TOP} V{y0} H{}" stroke="black" fill="none"/>"#,
        x0 + plot_w
    );
    for &len in &lengths {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{len}</text>"#,
            x(len),
            y0 + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sequence length T</text>"#,
        x0 + plot_w / 2.0,
        y0 + 38.0
    );
    for i in 0..=5 {
        let ms = y_max * i as f64 / 5.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{ms:.1}</text><path d="M{x0} {:.1} H{}" stroke="#ddd"/>"##,
            x0 - 6.0,
            y(ms) + 4.0,
            y(ms),
            x0 + plot_w
        );
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(len, ms)| format!("{:.1},{:.1}", x(len), y(ms)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(len, ms) in points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(len),
                y(ms)
            );
        }
        let legend_y = MARGIN_TOP + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{color}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            x0 + 12.0,
            legend_y - 4.0,
            x0 + 30.0,
            legend_y
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(seq_len: usize, series: &str, ms: f64) -> Measurement {
        Measurement {
            backend: "cuda".into(),
            dtype: "bf16".into(),
            phase: "forward".into(),
            seq_len,
            series: series.into(),
            ms,
        }
    }

    #[test]
    fn csv_has_one_row_per_measurement() {
        let rows = [
            measurement(8192, "selected", 3.36),
            measurement(16384, "selected", 6.77),
        ];
        let text = csv(&rows);
        assert_eq!(text.lines().count(), 3);
        assert_eq!(
            text.lines().nth(1),
            Some("cuda,bf16,forward,8192,\"selected\",3.36")
        );
    }

    #[test]
    fn plot_draws_a_line_per_series() {
        let rows = [
            measurement(8192, "selected", 3.36),
            measurement(16384, "selected", 6.77),
            measurement(8192, "window", 0.99),
            measurement(16384, "window", 1.84),
        ];
        let refs: Vec<&Measurement> = rows.iter().collect();
        let svg = plot("t", &refs);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.ends_with("</svg>\n"));
    }
}
