//! Results: latency summaries from HDR histograms, the terminal table, JSON and SVG files.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A new histogram of microseconds, 1 µs to 10 min, 3 significant digits.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    pub fn row(&self, name: &str) -> String {
        format!(
            "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            self.count,
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us)
        )
    }

    pub fn header() -> String {
        format!(
            "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        )
    }
}

pub fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// Histogram contents as (value, count) pairs: how worker processes hand theirs to the parent.
pub fn dump(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn load(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, c) in pairs {
        let _ = h.record_n(v.max(1), c);
    }
}

pub fn write_json<T: Serialize>(path: &str, v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            if let Err(e) = std::fs::write(path, s + "\n") {
                eprintln!("writing {path}: {e}");
            } else {
                eprintln!("wrote {path}");
            }
        }
        Err(e) => eprintln!("json: {e}"),
    }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A latency-by-percentile plot (x: percentile on the usual 1/(1-p) log scale, y: ms, log),
/// one line per histogram.
pub fn svg_percentiles(path: &str, title: &str, series: &[(&str, &Histogram<u64>)]) {
    let (w, h, left, right, top, bottom) = (760.0, 440.0, 70.0, 20.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    // x in decades of 1/(1-p): 0 → p0, 1 → p90, 2 → p99, 3 → p99.9, 4 → p99.99
    let xmax = 4.0f64;
    let mut ymin = f64::MAX;
    let mut ymax: f64 = 0.0;
    let mut lines = Vec::new();
    for (_, hg) in series {
        if hg.is_empty() {
            lines.push(Vec::new());
            continue;
        }
        let mut pts = Vec::new();
        let steps = 200;
        for i in 0..=steps {
            let x = xmax * i as f64 / steps as f64;
            let q = 1.0 - 10f64.powf(-x);
            let v = hg.value_at_quantile(q.min(1.0)) as f64 / 1000.0;
            let v = v.max(0.001);
            ymin = ymin.min(v);
            ymax = ymax.max(v);
            pts.push((x, v));
        }
        pts.push((xmax, (hg.max() as f64 / 1000.0).max(0.001)));
        ymax = ymax.max(hg.max() as f64 / 1000.0);
        lines.push(pts);
    }
    if ymax <= 0.0 {
        ymin = 0.001;
        ymax = 1.0;
    }
    let lo = ymin.max(0.001).log10().floor();
    let hi = ymax.max(0.002).log10().ceil().max(lo + 1.0);
    let sx = |x: f64| left + x / xmax * pw;
    let sy = |v: f64| top + ph - (v.log10() - lo) / (hi - lo) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    for (i, label) in ["p0", "p90", "p99", "p99.9", "p99.99"].iter().enumerate() {
        let x = sx(i as f64);
        s += &format!(
            "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/>\
             <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
            top + ph,
            top + ph + 16.0
        );
    }
    let mut d = lo;
    while d <= hi + 1e-9 {
        let v = 10f64.powf(d);
        let y = sy(v);
        s += &format!(
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_ms(v)
        );
        d += 1.0;
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text>\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">latency (ms, log)</text>\n",
        left + pw / 2.0,
        h - 8.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, ((name, hg), pts)) in series.iter().zip(&lines).enumerate() {
        let c = COLORS[i % COLORS.len()];
        if !pts.is_empty() {
            let p: Vec<String> = pts
                .iter()
                .map(|&(x, v)| format!("{:.1},{:.1}", sx(x), sy(v)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
                p.join(" ")
            );
        }
        let ly = top + 14.0 + 16.0 * i as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{c}\"/>\
             <text x=\"{}\" y=\"{}\">{} (n={}, p99 {} ms)</text>\n",
            left + 10.0,
            ly - 4.0,
            left + 28.0,
            ly,
            esc(name),
            hg.len(),
            if hg.is_empty() {
                "-".into()
            } else {
                ms(hg.value_at_quantile(0.99))
            }
        );
    }
    s += &format!(
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n</svg>\n"
    );
    match std::fs::write(path, s) {
        Ok(()) => eprintln!("wrote {path}"),
        Err(e) => eprintln!("writing {path}: {e}"),
    }
}

fn fmt_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn kib(b: f64) -> String {
    format!("{:.2} KiB", b / 1024.0)
}
