//! The `compare.svg` chart, written by hand: for each workload, grouped bars of p50/p99/p99.9
//! latency for both servers (log scale), and below it their IOPS (linear scale). A server that
//! failed a workload gets a grey "failed" marker with the reason as a tooltip; under each
//! workload, qcow2d's IOPS as a multiple of QSD's. Pure string building; called once at the
//! end of `compare`.

use std::fmt::Write;

/// What the chart shows of one server on one workload.
#[derive(Clone, Debug)]
pub struct ChartValues {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub iops: f64,
}

/// One workload: the values of qcow2d and of QSD, or why each failed.
#[derive(Clone, Debug)]
pub struct ChartRow {
    pub name: String,
    pub servers: [Result<ChartValues, String>; 2],
}

const SERVER_NAMES: [&str; 2] = ["qcow2d", "qemu-storage-daemon"];
/// Light to dark: p50, p99, p99.9, and the IOPS bar uses the middle one.
const COLORS: [[&str; 3]; 2] = [
    ["#9ecae1", "#4292c6", "#08519c"],
    ["#fdae6b", "#f16913", "#a63603"],
];
const PERCENTILES: [&str; 3] = ["p50", "p99", "p99.9"];

const BAR_W: f64 = 18.0;
const BAR_GAP: f64 = 2.0;
const SERVER_GAP: f64 = 10.0;
const GROUP_PAD: f64 = 36.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TITLE_H: f64 = 70.0;
const LAT_H: f64 = 300.0;
const IOPS_H: f64 = 200.0;
const PANEL_GAP: f64 = 90.0;
const BOTTOM: f64 = 60.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `1234.5` -> `1.23k`, `2500000` -> `2.50M`, small values with one decimal.
fn short_number(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value == 0.0 {
        "0".into()
    } else {
        format!("{value:.1}")
    }
}

/// A latency for a bar label: `85.2µs`, `850µs`, `6.5ms`, `1.2s`.
fn short_latency(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.1}s", us / 1e6)
    } else if us >= 1e4 {
        format!("{:.0}ms", us / 1e3)
    } else if us >= 1e3 {
        format!("{:.1}ms", us / 1e3)
    } else if us >= 100.0 {
        format!("{us:.0}µs")
    } else {
        format!("{us:.1}µs")
    }
}

fn latency_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

/// A "nice" axis step (1, 2 or 5 times a power of ten) giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * magnitude)
}

pub fn render(rows: &[ChartRow], title: &str) -> String {
    let group_w = 6.0 * BAR_W + 4.0 * BAR_GAP + SERVER_GAP + GROUP_PAD;
    let width = (LEFT + rows.len() as f64 * group_w + RIGHT).max(720.0);
    let height = TITLE_H + LAT_H + PANEL_GAP + IOPS_H + BOTTOM;
    let lat_top = TITLE_H;
    let lat_bottom = lat_top + LAT_H;
    let iops_top = lat_bottom + PANEL_GAP;
    let iops_bottom = iops_top + IOPS_H;

    let ok_values = || {
        rows.iter()
            .flat_map(|r| r.servers.iter().filter_map(|s| s.as_ref().ok()))
    };
    // Latency axis: whole decades around all values (log scale).
    let lat_values: Vec<f64> = ok_values()
        .flat_map(|v| [v.p50_us, v.p99_us, v.p999_us])
        .filter(|&v| v > 0.0)
        .collect();
    // A third of a decade of room below the shortest bar, so that it stays visible.
    let lat_min_decade = (lat_values
        .iter()
        .fold(f64::INFINITY, |m, &v| m.min(v))
        .log10()
        - 0.3)
        .floor();
    let lat_max_decade = lat_values
        .iter()
        .fold(0.0f64, |m, &v| m.max(v))
        .log10()
        .ceil();
    let (lat_lo, lat_hi) = if lat_values.is_empty() {
        (0.0, 3.0)
    } else {
        (lat_min_decade, lat_max_decade.max(lat_min_decade + 1.0))
    };
    let lat_y = |us: f64| {
        let decades = us.max(10f64.powf(lat_lo)).log10();
        lat_bottom - (decades - lat_lo) / (lat_hi - lat_lo) * LAT_H
    };
    let iops_max = ok_values().map(|v| v.iops).fold(0.0f64, f64::max);
    let iops_step = nice_step(iops_max);
    let iops_top_value = ((iops_max / iops_step).ceil() * iops_step).max(iops_step);
    let iops_y = |iops: f64| iops_bottom - iops / iops_top_value * IOPS_H;

    let mut s = String::new();
    // Writing into a String cannot fail; the results of write! are ignored on purpose.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        width / 2.0,
        escape(title)
    );

    // Legend.
    let mut x = LEFT;
    for (server, colors) in COLORS.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{x:.0}" y="50" font-weight="bold">{}</text>"#,
            SERVER_NAMES[server]
        );
        // Bold 12 px sans-serif is at most about 8 px per character.
        x += SERVER_NAMES[server].len() as f64 * 8.0 + 14.0;
        for (color, name) in colors.iter().zip(PERCENTILES) {
            let _ = writeln!(
                s,
                r#"<rect x="{x:.0}" y="40" width="12" height="12" fill="{color}"/><text x="{:.0}" y="50">{name}</text>"#,
                x + 16.0
            );
            x += 62.0;
        }
        x += 30.0;
    }

    // Latency panel: grid at every decade.
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.0}" transform="rotate(-90 20 {:.0})" text-anchor="middle" font-weight="bold">latency (log scale)</text>"#,
        (lat_top + lat_bottom) / 2.0,
        (lat_top + lat_bottom) / 2.0
    );
    let mut decade = lat_lo;
    while decade <= lat_hi + 0.5 {
        let us = 10f64.powf(decade);
        let y = lat_y(us);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            width - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            latency_label(us)
        );
        decade += 1.0;
    }
    // IOPS panel: grid at nice steps.
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.0}" transform="rotate(-90 20 {:.0})" text-anchor="middle" font-weight="bold">IOPS</text>"#,
        (iops_top + iops_bottom) / 2.0,
        (iops_top + iops_bottom) / 2.0
    );
    let mut tick = 0.0;
    while tick <= iops_top_value + iops_step / 2.0 {
        let y = iops_y(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            width - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            short_number(tick)
        );
        tick += iops_step;
    }

    for (index, row) in rows.iter().enumerate() {
        let group_x = LEFT + index as f64 * group_w + GROUP_PAD / 2.0;
        let center = group_x + (group_w - GROUP_PAD) / 2.0;
        for y in [lat_bottom, iops_bottom] {
            let _ = writeln!(
                s,
                r#"<text x="{center:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
                y + 20.0,
                escape(&row.name)
            );
        }
        if let [Ok(a), Ok(b)] = &row.servers {
            if b.iops > 0.0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{center:.1}" y="{:.1}" text-anchor="middle" fill="#555">qcow2d IOPS ×{:.2}</text>"##,
                    iops_bottom + 36.0,
                    a.iops / b.iops
                );
            }
        }
        for (server, values) in row.servers.iter().enumerate() {
            let server_x = group_x + server as f64 * (3.0 * BAR_W + 2.0 * BAR_GAP + SERVER_GAP);
            let server_w = 3.0 * BAR_W + 2.0 * BAR_GAP;
            match values {
                Ok(v) => {
                    for (bar, us) in [v.p50_us, v.p99_us, v.p999_us].into_iter().enumerate() {
                        let x = server_x + bar as f64 * (BAR_W + BAR_GAP);
                        let y = lat_y(us);
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{y:.1}" width="{BAR_W}" height="{:.1}" fill="{}"><title>{} {} {us:.1} µs</title></rect>"#,
                            (lat_bottom - y).max(0.0),
                            COLORS[server][bar],
                            SERVER_NAMES[server],
                            PERCENTILES[bar]
                        );
                        let label_x = x + BAR_W / 2.0 + 3.0;
                        let label_y = y - 4.0;
                        let _ = writeln!(
                            s,
                            r#"<text x="{label_x:.1}" y="{label_y:.1}" font-size="10" transform="rotate(-90 {label_x:.1} {label_y:.1})">{}</text>"#,
                            short_latency(us)
                        );
                    }
                    let y = iops_y(v.iops);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{server_x:.1}" y="{y:.1}" width="{server_w:.1}" height="{:.1}" fill="{}"><title>{} {:.0} IOPS</title></rect>"#,
                        (iops_bottom - y).max(0.0),
                        COLORS[server][1],
                        SERVER_NAMES[server],
                        v.iops
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
                        server_x + server_w / 2.0,
                        y - 4.0,
                        short_number(v.iops)
                    );
                }
                Err(reason) => {
                    for (top, bottom) in [(lat_top, lat_bottom), (iops_top, iops_bottom)] {
                        let mid_x = server_x + server_w / 2.0;
                        let mid_y = (top + bottom) / 2.0;
                        let _ = writeln!(
                            s,
                            r##"<g><title>{} failed: {}</title><rect x="{server_x:.1}" y="{top:.1}" width="{server_w:.1}" height="{:.1}" fill="#eee" stroke="#bbb" stroke-dasharray="4 3"/><text x="{mid_x:.1}" y="{mid_y:.1}" text-anchor="middle" fill="#777" transform="rotate(-90 {mid_x:.1} {mid_y:.1})">{} failed</text></g>"##,
                            SERVER_NAMES[server],
                            escape(reason),
                            bottom - top,
                            if server == 0 { "qcow2d" } else { "QSD" }
                        );
                    }
                }
            }
        }
    }
    for y in [lat_bottom, iops_bottom] {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="#333"/>"##,
            width - RIGHT
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_bars_and_failures() {
        let rows = vec![
            ChartRow {
                name: "randread-4k-qd32".into(),
                servers: [
                    Ok(ChartValues {
                        p50_us: 80.0,
                        p99_us: 300.0,
                        p999_us: 900.0,
                        iops: 150_000.0,
                    }),
                    Ok(ChartValues {
                        p50_us: 200.0,
                        p99_us: 800.0,
                        p999_us: 2500.0,
                        iops: 60_000.0,
                    }),
                ],
            },
            ChartRow {
                name: "randwrite-4k-qd32".into(),
                servers: [
                    Err("write: Input/output error <EIO>".into()),
                    Ok(ChartValues {
                        p50_us: 300.0,
                        p99_us: 900.0,
                        p999_us: 4000.0,
                        iops: 40_000.0,
                    }),
                ],
            },
        ];
        let svg = render(&rows, "test & chart");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("test &amp; chart"));
        assert!(svg.contains("&lt;EIO&gt;"), "reasons are escaped");
        assert!(svg.contains("qcow2d failed"));
        assert!(svg.contains("150k"));
        assert!(
            svg.contains("qcow2d IOPS ×2.50"),
            "ratio under the first workload"
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn chart_with_only_failures_is_valid() {
        let rows = vec![ChartRow {
            name: "w".into(),
            servers: [Err("a".into()), Err("b".into())],
        }];
        let svg = render(&rows, "t");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(100.0), 20.0);
        assert_eq!(nice_step(150_000.0), 50_000.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(short_number(1234.0), "1.2k");
        assert_eq!(short_number(2_500_000.0), "2.50M");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_latency(85.24), "85.2µs");
        assert_eq!(short_latency(6500.0), "6.5ms");
        assert_eq!(short_latency(25_000.0), "25ms");
    }
}
