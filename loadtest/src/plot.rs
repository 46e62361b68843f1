//! The SVG for the docs: ack latency (p50, p99, max per second) above, acknowledged appends per
//! second below. Built with plotters' SVG backend only: without a font feature plotters sizes
//! text with a built-in estimate and the SVG carries plain `<text>` elements, so captions and
//! axis labels still render (in the viewer's default sans-serif) and no C font stack is built.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;
use crate::stats::TimelinePoint;

/// A line: its legend name, colour, and the value it takes from each second.
type Series<T> = (&'static str, RGBColor, fn(&TimelinePoint) -> T);
use crate::LoadError;

fn err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Plot(e.to_string())
}

pub fn write_svg(path: &Path, report: &Report) -> Result<(), LoadError> {
    let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(400);
    let points = &report.timeline;
    let seconds = (points.len() as f64).max(1.0);

    let max_ms = points
        .iter()
        .map(|p| p.max_ms)
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.05;
    let mut latency = ChartBuilder::on(&top)
        .caption(
            format!(
                "{} — {}: ack latency per second (ms)",
                report.label, report.scenario
            ),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..seconds, 0.0..max_ms)
        .map_err(err)?;
    latency
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    let series: [Series<f64>; 3] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p99", RED, |p| p.p99_ms),
        ("max", BLACK, |p| p.max_ms),
    ];
    for (name, color, value) in series {
        latency
            .draw_series(LineSeries::new(
                points
                    .iter()
                    .filter(|p| p.ok > 0)
                    .map(|p| (p.second as f64 + 0.5, value(p))),
                color,
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    latency
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;

    let max_rate = points
        .iter()
        .map(|p| (p.ok + p.try_again + p.errors) as f64)
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.05;
    let mut rate = ChartBuilder::on(&bottom)
        .caption("answers per second", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..seconds, 0.0..max_rate)
        .map_err(err)?;
    rate.configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()
        .map_err(err)?;
    let series: [Series<u64>; 3] = [
        ("ok", GREEN, |p| p.ok),
        ("try_again", MAGENTA, |p| p.try_again),
        ("errors", RED, |p| p.errors),
    ];
    for (name, color, value) in series {
        rate.draw_series(LineSeries::new(
            points
                .iter()
                .map(|p| (p.second as f64 + 0.5, value(p) as f64)),
            color,
        ))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    rate.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
