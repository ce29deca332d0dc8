//! Tables, medians, percentiles and the throughput chart.

use std::path::Path;

use clap::ValueEnum;
use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::backend::Kind;
use crate::throughput::Point;
use crate::Result;

/// The median of `v` (the mean of the middle two for an even count; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// p50 / p99 / p99.9 / max of a nanosecond histogram, in ms.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Percentiles {
    /// Read them off `h` (values in ns).
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1e6;
        Self {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// The four as table cells.
    pub fn cells(&self) -> [String; 4] {
        [self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms].map(|v| format!("{v:.3}"))
    }
}

/// A plain-text table with right-aligned columns.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(head: &[&str]) -> Self {
        Self {
            head: head.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Add a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Print it to stdout.
    pub fn print(&self) {
        let widths: Vec<usize> = (0..self.head.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain(std::iter::once(&self.head[i]))
                    .map(String::len)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(&self.head));
        for r in &self.rows {
            println!("{}", line(r));
        }
    }
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draw jobs/s against concurrency to a PNG at `path`: one panel per backend, each
/// with the framework and the raw loop and the ratio at every point. Text needs the
/// DejaVu Sans font (Debian's fonts-dejavu-core).
pub fn chart(points: &[Point], path: &Path) -> Result<()> {
    let font = std::fs::read(FONT).map_err(|e| format!("cannot read the font {FONT}: {e}"))?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "the font could not be loaded")?;
    let mut backends: Vec<&str> = points.iter().map(|p| p.backend).collect();
    backends.dedup();
    let root =
        BitMapBackend::new(path, (560 * backends.len().max(1) as u32, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Drain throughput against concurrency (one process, no-op handler, 100 B payloads)",
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((1, backends.len().max(1)));
    for (panel, backend) in panels.iter().zip(&backends) {
        let mine: Vec<&Point> = points.iter().filter(|p| p.backend == *backend).collect();
        let max_c = mine.iter().map(|p| p.concurrency).max().unwrap_or(1).max(2);
        let max_y = mine
            .iter()
            .flat_map(|p| [p.framework, p.raw])
            .fold(1.0_f64, f64::max)
            * 2.0;
        let min_y = mine
            .iter()
            .flat_map(|p| [p.framework, p.raw])
            .fold(f64::MAX, f64::min)
            .clamp(1.0, max_y)
            / 2.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(*backend, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d((1u32..max_c * 2).log_scale(), (min_y..max_y).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .x_desc("concurrency C")
            .y_desc("jobs per second (log)")
            .x_label_formatter(&|c| c.to_string())
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (series, raw, color) in [("framework", false, RED), ("raw loop", true, BLUE)] {
            let data: Vec<(u32, f64)> = mine
                .iter()
                .map(|p| (p.concurrency, if raw { p.raw } else { p.framework }))
                .collect();
            let style = ShapeStyle::from(color).stroke_width(2);
            chart
                .draw_series(LineSeries::new(data.clone(), style))?
                .label(series)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, style.filled())),
            )?;
        }
        chart.draw_series(mine.iter().map(|p| {
            Text::new(
                format!("{:.2}x", p.ratio()),
                (p.concurrency, p.framework * 0.8),
                ("sans-serif", 14),
            )
        }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The throughput points (without prefetch) among the JSON lines of a run's output.
pub fn points_from(output: &str) -> Vec<Point> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["scenario"] == "throughput" && v["prefetch"].as_u64().unwrap_or(0) == 0)
        .flat_map(|v| v["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            let name = p["backend"].as_str()?;
            let backend = Kind::value_variants()
                .iter()
                .map(|k| k.name())
                .find(|k| *k == name)?;
            Some(Point {
                backend,
                concurrency: p["concurrency"].as_u64()? as u32,
                processes: p["processes"].as_u64()? as u32,
                framework: p["framework"].as_f64()?,
                raw: p["raw"].as_f64()?,
                framework_runs: Vec::new(),
                raw_runs: Vec::new(),
                framework_redis_us: p["framework_redis_us"].as_f64(),
                raw_redis_us: p["raw_redis_us"].as_f64(),
            })
        })
        .collect()
}
