//! Tables, medians, percentiles and the throughput chart.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

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

/// Draw jobs/s against concurrency, one framework and one raw line per backend,
/// to a PNG at `path`. Text needs the DejaVu Sans font (Debian's fonts-dejavu-core).
pub fn chart(points: &[Point], path: &Path) -> Result<()> {
    let font = std::fs::read(FONT).map_err(|e| format!("cannot read the font {FONT}: {e}"))?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "the font could not be loaded")?;
    let max_c = points
        .iter()
        .map(|p| p.concurrency)
        .max()
        .unwrap_or(1)
        .max(2);
    let max_y = points
        .iter()
        .flat_map(|p| [p.framework, p.raw])
        .fold(0.0_f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Drain throughput against concurrency (one process, no-op handler)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((1u32..max_c).log_scale(), 0.0..max_y.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("concurrency C (log scale)")
        .y_desc("jobs per second")
        .x_label_formatter(&|c| c.to_string())
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let mut backends: Vec<&str> = points.iter().map(|p| p.backend).collect();
    backends.dedup();
    for (i, backend) in backends.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mine: Vec<&Point> = points.iter().filter(|p| p.backend == *backend).collect();
        for (series, raw) in [("framework", false), ("raw loop", true)] {
            let data: Vec<(u32, f64)> = mine
                .iter()
                .map(|p| (p.concurrency, if raw { p.raw } else { p.framework }))
                .collect();
            let style = if raw {
                ShapeStyle::from(color.mix(0.6)).stroke_width(2)
            } else {
                ShapeStyle::from(color).stroke_width(3)
            };
            chart
                .draw_series(LineSeries::new(data.clone(), style))?
                .label(format!("{backend} {series}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, style.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
