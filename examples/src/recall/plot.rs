//! SVG plots of a report, written by hand: accuracy against sequence length (one line per
//! attention kind) and a heat map of accuracy by depth and length (one panel per kind).

use std::fmt::Write as _;

use super::report::Report;
use super::task::DepthBand;

const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];
const FONT: &str = r#"font-family="sans-serif" font-size="12""#;

/// A line plot: mean accuracy over the depth bins against the sequence length (log scale),
/// one line per attention kind, with the chance level (one value in `values`) dashed.
pub fn accuracy_by_length(report: &Report) -> String {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 130.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 50.0;
    let lengths = &report.config.evaluation.seq_lens;
    let log = |len: usize| (len as f64).log2();
    let x_min = lengths
        .iter()
        .copied()
        .map(log)
        .fold(f64::INFINITY, f64::min);
    let x_max = lengths
        .iter()
        .copied()
        .map(log)
        .fold(f64::NEG_INFINITY, f64::max);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |len: usize| {
        if x_max > x_min {
            LEFT + (log(len) - x_min) / (x_max - x_min) * plot_w
        } else {
            LEFT + plot_w / 2.0
        }
    };
    let y = |accuracy: f64| TOP + plot_h * (1.0 - accuracy);

    let mut svg = header(WIDTH, HEIGHT);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">Recall accuracy by sequence length (trained at T = {})</text>"#,
        WIDTH / 2.0,
        report.config.train_len
    );
    let (x0, y0) = (LEFT, TOP + plot_h);
    let _ = writeln!(
        svg,
        r#"<path d="M{x0} {TOP} V{y0} H{}" stroke="black" fill="none"/>"#,
        x0 + plot_w
    );
    for &len in lengths {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(len),
            y0 + 18.0,
            short_length(len)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sequence length T</text>"#,
        x0 + plot_w / 2.0,
        y0 + 38.0
    );
    for tick in 0..=5 {
        let accuracy = tick as f64 / 5.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{accuracy:.1}</text><path d="M{x0} {:.1} H{}" stroke="#ddd"/>"##,
            x0 - 6.0,
            y(accuracy) + 4.0,
            y(accuracy),
            x0 + plot_w
        );
    }
    let chance = 1.0 / report.config.task.values as f64;
    let _ = writeln!(
        svg,
        r##"<path d="M{x0} {:.1} H{}" stroke="#888" stroke-dasharray="4 4"/><text x="{:.1}" y="{:.1}" fill="#888">chance</text>"##,
        y(chance),
        x0 + plot_w,
        x0 + plot_w + 6.0,
        y(chance) + 4.0
    );
    for (i, model) in report.models.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = model
            .evaluation
            .iter()
            .filter_map(|result| Some((x(result.seq_len), y(result.accuracy?))))
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (px, py) in points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{color}"/>"#
            );
        }
        let legend_y = TOP + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="14" height="3" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x0 + plot_w + 10.0,
            legend_y - 4.0,
            x0 + plot_w + 30.0,
            legend_y,
            model.attention.name()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A heat map per attention kind, side by side: rows the depth bins (the start of the
/// context at the top), columns the sequence lengths, each cell its accuracy; a length a
/// model was not evaluated at is grey.
pub fn accuracy_by_depth(report: &Report) -> String {
    const CELL_W: f64 = 56.0;
    const CELL_H: f64 = 28.0;
    const LEFT: f64 = 90.0;
    const GAP: f64 = 24.0;
    const TOP: f64 = 70.0;
    const BOTTOM: f64 = 50.0;
    let lengths = &report.config.evaluation.seq_lens;
    let bins = report.config.evaluation.depth_bins;
    let panel_w = CELL_W * lengths.len() as f64;
    let width = LEFT + (panel_w + GAP) * report.models.len() as f64;
    let height = TOP + CELL_H * bins as f64 + BOTTOM;

    let mut svg = header(width, height);
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="24" font-size="15" text-anchor="middle">Recall accuracy by depth of the pairs and sequence length</text>"#,
        width / 2.0
    );
    for bin in 0..bins {
        let DepthBand { from, to } = DepthBand::bin(bin, bins);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}-{:.0}%</text>"#,
            LEFT - 8.0,
            TOP + CELL_H * (bin as f64 + 0.5) + 4.0,
            from * 100.0,
            to * 100.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">depth in the context</text>"#,
        TOP + CELL_H * bins as f64 / 2.0,
        TOP + CELL_H * bins as f64 / 2.0
    );
    for (panel, model) in report.models.iter().enumerate() {
        let left = LEFT + (panel_w + GAP) * panel as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
            left + panel_w / 2.0,
            TOP - 12.0,
            model.attention.name()
        );
        for (column, result) in model.evaluation.iter().enumerate() {
            let cx = left + CELL_W * column as f64;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                cx + CELL_W / 2.0,
                TOP + CELL_H * bins as f64 + 18.0,
                short_length(result.seq_len)
            );
            for row in 0..bins {
                let cy = TOP + CELL_H * row as f64;
                let (fill, label, ink) = match result.by_depth.get(row) {
                    Some(cell) => (
                        heat(cell.accuracy),
                        format!("{:.2}", cell.accuracy),
                        if cell.accuracy > 0.6 {
                            "white"
                        } else {
                            "black"
                        },
                    ),
                    None => ("#e5e5e5".to_string(), "-".to_string(), "#888"),
                };
                let _ = writeln!(
                    svg,
                    r#"<rect x="{cx:.1}" y="{cy:.1}" width="{CELL_W}" height="{CELL_H}" fill="{fill}" stroke="white"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{ink}">{label}</text>"#,
                    cx + CELL_W / 2.0,
                    cy + CELL_H / 2.0 + 4.0
                );
            }
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sequence length T</text>"#,
        width / 2.0,
        height - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn header(width: f64, height: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" {FONT}>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    )
}

/// `1024` as `1k`, `65536` as `64k`; other lengths in full.
fn short_length(len: usize) -> String {
    if len >= 1024 && len.is_multiple_of(1024) {
        format!("{}k", len / 1024)
    } else {
        len.to_string()
    }
}

/// The color of an accuracy in `0..=1`: from near white to dark blue.
fn heat(accuracy: f64) -> String {
    let a = accuracy.clamp(0.0, 1.0);
    let channel = |low: f64, high: f64| (low + (high - low) * a).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        channel(247.0, 8.0),
        channel(251.0, 48.0),
        channel(255.0, 107.0)
    )
}
