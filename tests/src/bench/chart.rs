//! The scale phase as a picture: drain rate against the tenant count, beside the JSON report.

use crate::bench::args::TenantCounts;
use crate::bench::report::{keys, Report};
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (720, 420);

/// Draws the uniform drains as a line and the Zipf drain as a point, on a log tenant axis.
/// Returns false (and writes nothing) when the run measured no scale drain.
pub fn scale_chart(
    report: &Report,
    counts: &TenantCounts,
    zipf_exponent: f64,
    path: &Path,
) -> Result<bool, Box<dyn std::error::Error>> {
    let rate = |tenants: u32, zipf: bool| {
        report
            .median(&keys::scale(tenants, zipf, keys::Scale::Drain))
            .map(|r| (f64::from(tenants), r))
    };
    let uniform: Vec<(f64, f64)> = counts
        .all()
        .iter()
        .filter_map(|&t| rate(t, false))
        .collect();
    let zipf = rate(counts.most(), true);
    if uniform.is_empty() && zipf.is_none() {
        return Ok(false);
    }
    let top = uniform
        .iter()
        .chain(zipf.iter())
        .map(|&(_, r)| r)
        .fold(0.0, f64::max)
        * 1.15;
    let x_range = (f64::from(counts.baseline()) * 0.7)..(f64::from(counts.most()) * 1.4);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "avsync worker: drain rate by tenant count (one worker, defaults)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.log_scale(), 0.0..top.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("tenants (log scale)")
        .y_desc("events/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            uniform.iter().copied(),
            BLUE.stroke_width(2),
        ))?
        .label("uniform activity")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(
        uniform
            .iter()
            .map(|&(x, y)| Circle::new((x, y), 4, BLUE.filled())),
    )?;
    chart.draw_series(uniform.iter().map(|&(x, y)| {
        Text::new(
            format!("{y:.0}/s"),
            (x, y),
            ("sans-serif", 12).into_font().color(&BLACK),
        )
    }))?;
    if let Some((x, y)) = zipf {
        chart
            .draw_series(std::iter::once(TriangleMarker::new(
                (x, y),
                7,
                RED.filled(),
            )))?
            .label(format!("Zipf activity, s = {zipf_exponent}"))
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, RED.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}
