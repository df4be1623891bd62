//! The results: a record per case, the table printed per adapter, and the JSON and SVG files,
//! written by hand (no serialisation or plotting dependency for one file each).

use std::fmt::Write as _;

use lsce::{Dtype, KernelConfig};

use crate::cli::{Options, CPU_MAX_ELEMENTS};
use crate::gpu::Gpu;

/// Medians in milliseconds.
#[derive(Clone, Debug)]
pub struct Measures {
    pub copy_ms: f64,
    pub read_ms: f64,
    pub fused_ms: f64,
    pub forward_ms: f64,
    pub unfused_ms: f64,
    /// Scaled to all rows when only `cpu_rows` were timed.
    pub cpu_ms: f64,
    pub cpu_rows: u32,
    pub scratch_bytes: u64,
    pub plan_windows: usize,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub backend: &'static str,
    pub adapter: String,
    pub device_type: String,
    pub timing: &'static str,
    pub rows: u32,
    pub classes: u32,
    pub dtype: Dtype,
    pub repeats: usize,
    pub config: KernelConfig,
    /// Whether the reductions used subgroup operations.
    pub subgroups: bool,
    /// The measures, or why the case was skipped.
    pub outcome: Result<Measures, String>,
}

/// Bandwidths and ratios derived from a record's times.
struct Rates {
    copy_gbps: f64,
    read_gbps: f64,
    fused_gbps: f64,
    forward_gbps: f64,
    ratio_to_copy: f64,
    forward_ratio_to_read: f64,
    speedup_vs_unfused: f64,
}

impl Record {
    /// Bytes of one `rows x classes` tensor.
    fn tensor_bytes(&self) -> f64 {
        f64::from(self.rows) * f64::from(self.classes) * self.dtype.bytes() as f64
    }

    fn rates(&self, m: &Measures) -> Rates {
        let gbps = |bytes: f64, ms: f64| bytes / (ms * 1e6);
        let t = self.tensor_bytes();
        let (copy, read) = (gbps(2.0 * t, m.copy_ms), gbps(t, m.read_ms));
        let (fused, forward) = (gbps(2.0 * t, m.fused_ms), gbps(t, m.forward_ms));
        Rates {
            copy_gbps: copy,
            read_gbps: read,
            fused_gbps: fused,
            forward_gbps: forward,
            ratio_to_copy: fused / copy,
            forward_ratio_to_read: forward / read,
            speedup_vs_unfused: m.unfused_ms / m.fused_ms,
        }
    }
}

pub fn print_table(gpu: &Gpu, options: &Options, records: &[Record]) {
    let info = gpu.device.adapter_info();
    println!();
    println!(
        "adapter: {} | backend: {} | type: {:?} | driver: {} {}",
        info.name,
        info.backend.to_str(),
        info.device_type,
        info.driver,
        info.driver_info
    );
    println!(
        "timing: {} | median of {} runs after {} warm-up | spec: pytorch(0.1), class labels, mean",
        gpu.timing_name(),
        options.repeats,
        options.warmup
    );
    let limits = gpu.device.limits();
    let config = gpu.kernel.config();
    println!(
        "kernel: row_workgroup {}, row_cache {}, row_groups {}, row_teams {}, subgroups {} \
         (rows of at most {} classes: one subgroup each) | \
         max_buffer_size {}, max_storage_buffer_binding_size {}",
        config.row_workgroup,
        config.row_cache,
        config
            .max_row_workgroups
            .map_or("one per row".to_string(), |n| n.to_string()),
        config.min_row_teams,
        if gpu.kernel.uses_subgroups() {
            "yes"
        } else {
            "no"
        },
        config.subgroup_rows_max_classes,
        human_bytes(limits.max_buffer_size),
        human_bytes(limits.max_storage_buffer_binding_size)
    );
    println!(
        "{:<14} {:<5} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6} {:>10} {:>7} {:>10} {:>9}",
        "shape",
        "dtype",
        "copy GB/s",
        "read GB/s",
        "fused ms",
        "fused GB/s",
        "/copy",
        "fwd ms",
        "fwd GB/s",
        "/read",
        "unfused ms",
        "speedup",
        "cpu ms",
        "scratch"
    );
    for r in records {
        let shape = format!("{}x{}", r.rows, r.classes);
        let m = match &r.outcome {
            Ok(m) => m,
            Err(reason) => {
                // Through a String: Dtype's Display ignores the width.
                println!("{shape:<14} {:<5} skipped: {reason}", r.dtype.to_string());
                continue;
            }
        };
        let rt = r.rates(m);
        let cpu_mark = if m.cpu_rows < r.rows { "*" } else { " " };
        println!(
            "{shape:<14} {:<5} {:>9.2} {:>9.2} {:>9.3} {:>10.2} {:>6.2} {:>9.3} {:>9.2} {:>6.2} {:>10.3} {:>6.2}x {:>9.1}{cpu_mark} {:>9}",
            r.dtype.to_string(),
            rt.copy_gbps,
            rt.read_gbps,
            m.fused_ms,
            rt.fused_gbps,
            rt.ratio_to_copy,
            m.forward_ms,
            rt.forward_gbps,
            rt.forward_ratio_to_read,
            m.unfused_ms,
            rt.speedup_vs_unfused,
            m.cpu_ms,
            human_bytes(m.scratch_bytes),
        );
    }
    if records
        .iter()
        .any(|r| r.outcome.as_ref().is_ok_and(|m| m.cpu_rows < r.rows))
    {
        println!("* cpu: the first {CPU_MAX_ELEMENTS} logits' rows timed and scaled to all rows");
    }
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number, or `null` (JSON has no NaN or infinity).
pub fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// The records, then `extra` (already formatted objects: the Burn rows), as one JSON array.
pub fn to_json(records: &[Record], extra: &[String]) -> String {
    let mut rows: Vec<String> = records
        .iter()
        .map(|r| {
            let mut fields = vec![
                ("backend", json_string(r.backend)),
                ("adapter", json_string(&r.adapter)),
                ("device_type", json_string(&r.device_type)),
                ("timing", json_string(r.timing)),
                ("rows", r.rows.to_string()),
                ("classes", r.classes.to_string()),
                ("dtype", json_string(&r.dtype.to_string())),
                ("repeats", r.repeats.to_string()),
                ("row_workgroup", r.config.row_workgroup.to_string()),
                ("row_cache", r.config.row_cache.to_string()),
                (
                    "row_groups",
                    r.config
                        .max_row_workgroups
                        .map_or("null".to_string(), |n| n.to_string()),
                ),
                ("row_teams", r.config.min_row_teams.to_string()),
                ("subgroups", r.subgroups.to_string()),
                (
                    "skipped",
                    r.outcome
                        .as_ref()
                        .err()
                        .map_or("null".into(), |s| json_string(s)),
                ),
            ];
            let measured: [(&str, Option<f64>); 16] = {
                let m = r.outcome.as_ref().ok();
                let rt = m.map(|m| r.rates(m));
                let f = |g: fn(&Measures) -> f64| m.map(g);
                let h = |g: fn(&Rates) -> f64| rt.as_ref().map(g);
                [
                    ("fused_ms", f(|m| m.fused_ms)),
                    ("forward_ms", f(|m| m.forward_ms)),
                    ("unfused_ms", f(|m| m.unfused_ms)),
                    ("cpu_ms", f(|m| m.cpu_ms)),
                    ("cpu_rows", f(|m| f64::from(m.cpu_rows))),
                    ("copy_ms", f(|m| m.copy_ms)),
                    ("read_ms", f(|m| m.read_ms)),
                    ("copy_gbps", h(|r| r.copy_gbps)),
                    ("read_gbps", h(|r| r.read_gbps)),
                    ("fused_gbps", h(|r| r.fused_gbps)),
                    ("forward_gbps", h(|r| r.forward_gbps)),
                    ("ratio_to_copy", h(|r| r.ratio_to_copy)),
                    ("forward_ratio_to_read", h(|r| r.forward_ratio_to_read)),
                    ("speedup_vs_unfused", h(|r| r.speedup_vs_unfused)),
                    ("scratch_bytes", f(|m| m.scratch_bytes as f64)),
                    ("plan_windows", f(|m| m.plan_windows as f64)),
                ]
            };
            fields.extend(
                measured
                    .into_iter()
                    .map(|(k, v)| (k, v.map_or("null".into(), json_number))),
            );
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}: {v}", json_string(k)))
                .collect();
            format!("  {{{}}}", body.join(", "))
        })
        .collect();
    rows.extend_from_slice(extra);
    format!("[\n{}\n]\n", rows.join(",\n"))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `1000` as `1k`, `1000000` as `1M`.
fn si(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

/// ratio_to_copy against classes (log scale), one line per backend, dtype and adapter.
pub fn plot_svg(records: &[Record]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 520.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    ];
    let (left, right, top, bottom) = (70.0, W - 270.0, 60.0, H - 60.0);

    // Series in first-seen order, points sorted by classes.
    type Series<'r> = ((String, &'r str), Vec<(&'r Record, f64)>);
    let mut series: Vec<Series<'_>> = Vec::new();
    for r in records {
        let Ok(m) = &r.outcome else { continue };
        let ratio = r.rates(m).ratio_to_copy;
        if !ratio.is_finite() {
            continue;
        }
        let key = (format!("{} {}", r.backend, r.dtype), r.adapter.as_str());
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, points)) => points.push((r, ratio)),
            None => series.push((key, vec![(r, ratio)])),
        }
    }
    for (_, points) in &mut series {
        points.sort_by_key(|(r, _)| (r.classes, r.rows));
    }
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let log_classes = points()
        .map(|(r, _)| f64::from(r.classes).log10())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| {
            (lo.min(c), hi.max(c))
        });
    // A little room around the extreme points, and at least one decade.
    let (x_lo, x_hi) = match log_classes {
        (lo, hi) if lo.is_finite() => {
            let pad = (1.0 - (hi - lo)).max(0.0) / 2.0 + 0.15;
            (lo - pad, hi + pad)
        }
        _ => (2.0, 6.0),
    };
    let y_max = points().fold(1.0f64, |a, (_, v)| a.max(*v));
    let y_step = match y_max {
        m if m <= 1.2 => 0.1,
        m if m <= 3.0 => 0.25,
        _ => 1.0,
    };
    let y_hi = (y_max * 1.08 / y_step).ceil() * y_step;
    let px = |classes: f64| left + (classes.log10() - x_lo) / (x_hi - x_lo) * (right - left);
    let py = |v: f64| bottom - v / y_hi * (bottom - top);

    let mut s = String::new();
    let mut line = |text: String| {
        s.push_str(&text);
        s.push('\n');
    };
    line(format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    ));
    line(format!(r#"<rect width="{W}" height="{H}" fill="white"/>"#));
    line(format!(
        r#"<text x="{left}" y="24" font-size="16" font-weight="bold">Fused loss + gradient: fraction of copy bandwidth</text>"#
    ));
    line(format!(
        r##"<text x="{left}" y="42" fill="#555">fused GB/s / copy GB/s, both counting 2 x rows x classes x bytes; 1.0 = as fast as a copy</text>"##
    ));
    // x grid: every decade labelled; 2..9 x decade as light lines, 2 and 5 labelled when the
    // range is short.
    let short = x_hi - x_lo < 2.0;
    for decade in x_lo.floor() as i32..=x_hi.ceil() as i32 {
        for m in 1..10 {
            let v = 10f64.powi(decade) * f64::from(m);
            if !(x_lo..=x_hi).contains(&v.log10()) {
                continue;
            }
            let x = px(v);
            let stroke = if m == 1 { "#bbb" } else { "#eee" };
            line(format!(
                r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="{stroke}"/>"#
            ));
            if m == 1 || (short && (m == 2 || m == 5)) {
                line(format!(
                    r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    bottom + 18.0,
                    si(v)
                ));
            }
        }
    }
    for i in 0..=(y_hi / y_step).round() as u32 {
        let v = f64::from(i) * y_step;
        let y = py(v);
        line(format!(
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{v:.2}</text>"##,
            left - 6.0,
            y + 4.0
        ));
    }
    let y1 = py(1.0);
    line(format!(
        r##"<line x1="{left}" y1="{y1:.1}" x2="{right}" y2="{y1:.1}" stroke="#333" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333">copy bandwidth</text>"##,
        right - 4.0,
        y1 - 5.0
    ));
    line(format!(
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        right - left,
        bottom - top
    ));
    line(format!(
        r#"<text x="{}" y="{}" text-anchor="middle">classes (log scale)</text>"#,
        (left + right) / 2.0,
        H - 20.0
    ));
    line(format!(
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">ratio to copy bandwidth</text>"#,
        (top + bottom) / 2.0
    ));
    if series.is_empty() {
        line(format!(
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">no measured cases</text>"##,
            (left + right) / 2.0,
            (top + bottom) / 2.0
        ));
    }
    // Each shape is labelled once, at its first series' point: series often overlap.
    let mut labelled: Vec<(u32, u32)> = Vec::new();
    for (i, ((name, adapter), points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let xy = |r: &Record, v: f64| (px(f64::from(r.classes)), py(v));
        let path: Vec<String> = points
            .iter()
            .map(|(r, v)| {
                let (x, y) = xy(r, *v);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        line(format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        ));
        for (r, v) in points {
            let (x, y) = xy(r, *v);
            line(format!(
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{color}"><title>{name} {}x{}: {v:.3}</title></circle>"#,
                r.rows, r.classes
            ));
            if !labelled.contains(&(r.rows, r.classes)) {
                labelled.push((r.rows, r.classes));
                line(format!(
                    r##"<text x="{x:.1}" y="{:.1}" font-size="10" fill="#555" text-anchor="middle">{}x{}</text>"##,
                    y - 8.0,
                    r.rows,
                    r.classes
                ));
            }
        }
        // Legend right of the plot: the series, then its adapter (cut if long) in grey.
        let ly = top + 10.0 + 36.0 * i as f64;
        let adapter: String = adapter.chars().take(42).collect();
        line(format!(
            r##"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><circle cx="{}" cy="{ly}" r="4" fill="{color}"/><text x="{}" y="{}">{}</text><text x="{}" y="{}" font-size="10" fill="#555">{}</text>"##,
            right + 14.0,
            right + 38.0,
            right + 26.0,
            right + 44.0,
            ly + 4.0,
            xml_escape(name),
            right + 44.0,
            ly + 18.0,
            xml_escape(&adapter)
        ));
    }
    line("</svg>".into());
    s
}
