//! The report's plots, as SVG (drawn with plotters, no font files needed): ε spent per step by
//! both accountants, the training loss, the clipped fraction per step, and the held-out metric
//! per group (beside the non-private reference's, when given). The ε and group plots are part of
//! the release; the loss and clip plots are computed on the private data without noise and go to
//! the private part (`Plot::release`).
//!
//! Every series is one `<polyline>` (lines) or one `<rect>` per bar, and is named in the legend,
//! so tests can read the plotted values back out of the XML.

use super::{RunSummary, StepMetrics};
use plotters::prelude::*;

/// One plot of the report.
pub struct Plot {
    /// Path relative to its part of the run folder.
    pub file: &'static str,
    /// In `release/` (else `private/`).
    pub release: bool,
    pub title: &'static str,
    /// Whether the run has anything to show in it.
    pub when: fn(&RunSummary) -> bool,
    pub draw: fn(&RunSummary, &[StepMetrics]) -> Result<String, String>,
}

impl Plot {
    pub fn applies(&self, s: &RunSummary) -> bool {
        (self.when)(s)
    }
}

pub const PLOTS: [Plot; 4] = [
    Plot {
        file: "plots/epsilon.svg",
        release: true,
        title: "ε spent vs step (PLD and RDP upper bounds)",
        when: |s| !s.non_private && !s.epsilon_curve.is_empty(),
        draw: epsilon_plot,
    },
    Plot {
        file: "plots/loss.svg",
        release: false,
        title: "training loss vs step (mean over the logical batch)",
        when: |_| true,
        draw: loss_plot,
    },
    Plot {
        file: "plots/clip_fraction.svg",
        release: false,
        title: "fraction of the batch clipped vs step",
        when: |s| !s.non_private,
        draw: clip_plot,
    },
    Plot {
        file: "plots/groups.svg",
        release: true,
        title: "held-out metric per group",
        when: |s| !s.test_groups.is_empty(),
        draw: groups_plot,
    },
];

const SIZE: (u32, u32) = (800, 450);
const DP_COLOR: RGBColor = RGBColor(31, 119, 180);
const OTHER_COLOR: RGBColor = RGBColor(214, 39, 40);
const TARGET_COLOR: RGBColor = RGBColor(120, 120, 120);

/// A named line series.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

fn e(err: impl std::fmt::Display) -> String {
    format!("plotting: {err}")
}

/// Padded axis range covering `values` (and 0 when `from_zero`).
fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 * hi.abs().max(1.0) };
    (if from_zero && lo >= 0.0 { lo } else { lo - pad })..hi + pad
}

/// Line chart of `series` against `x_desc`; non-finite points are dropped.
pub fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    y_from_zero: bool,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(range(xs, true), range(ys, y_from_zero))
            .map_err(e)?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(e)?;
        for s in series {
            let color = s.color;
            let pts: Vec<(f64, f64)> =
                s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

fn epsilon_plot(s: &RunSummary, _: &[StepMetrics]) -> Result<String, String> {
    // ε = 0 before the first step.
    // A point an accountant could not compute (e.g. PLD at a tiny σ) is left out of its line.
    let pts = |f: fn(&super::EpsilonPoint) -> Option<f64>| {
        std::iter::once((0.0, 0.0))
            .chain(s.epsilon_curve.iter().filter_map(|p| f(p).map(|e| (p.step as f64, e))))
            .collect()
    };
    let mut series = vec![
        Series { name: "PLD".into(), color: DP_COLOR, points: pts(|p| p.pld) },
        Series { name: "RDP".into(), color: OTHER_COLOR, points: pts(|p| p.rdp) },
    ];
    if let Some(t) = s.target_epsilon {
        let last = s.epsilon_curve.last().map(|p| p.step as f64).unwrap_or(1.0);
        series
            .push(Series { name: format!("target ε = {t}"), color: TARGET_COLOR, points: vec![(0.0, t), (last, t)] });
    }
    line_chart(&format!("ε spent (δ = {:e})", s.delta), "step", "ε (upper bound)", &series, true)
}

fn loss_plot(_: &RunSummary, m: &[StepMetrics]) -> Result<String, String> {
    let points = m.iter().map(|x| (x.step as f64, x.mean_loss)).collect();
    line_chart(
        "training loss (private data, no noise)",
        "step",
        "mean loss",
        &[Series { name: "loss".into(), color: DP_COLOR, points }],
        false,
    )
}

fn clip_plot(_: &RunSummary, m: &[StepMetrics]) -> Result<String, String> {
    let points = m.iter().map(|x| (x.step as f64, x.clipped_fraction)).collect();
    line_chart(
        "fraction of per-example gradients clipped",
        "step",
        "clipped fraction",
        &[Series { name: "clipped fraction".into(), color: DP_COLOR, points }],
        true,
    )
}

/// A named bar series: one value per group, in the groups' order.
pub struct Bars {
    pub name: String,
    pub color: RGBColor,
    pub values: Vec<f64>,
}

/// Grouped bar chart: for each of `groups` (labelled with their sizes), one bar per series.
pub fn bar_chart(title: &str, y_desc: &str, groups: &[String], series: &[Bars]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let ys = series.iter().flat_map(|s| s.values.iter().copied());
        let y = range(ys, true);
        let y = y.start..y.end * 1.1;
        let n = groups.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(20)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, y.clone())
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .x_label_formatter(&|_| String::new())
            .y_desc(y_desc)
            .draw()
            .map_err(e)?;
        let k = series.len().max(1) as f64;
        let width = 0.8 / k;
        for (j, s) in series.iter().enumerate() {
            let color = s.color;
            let bars = s.values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(move |(i, &v)| {
                let x0 = i as f64 + 0.1 + j as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, v)], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        }
        let top = y.end;
        chart
            .draw_series(
                groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| Text::new(g.clone(), (i as f64 + 0.1, top * 0.97), ("sans-serif", 14).into_font())),
            )
            .map_err(e)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

fn groups_plot(s: &RunSummary, _: &[StepMetrics]) -> Result<String, String> {
    let names: Vec<String> = s.test_groups.iter().map(|g| format!("{} (n = {})", g.group, g.size)).collect();
    let metric = s.test_groups.first().map(|g| g.metric.name()).unwrap_or("metric");
    let mut series = vec![Bars {
        name: if s.non_private {
            "non-private".into()
        } else {
            format!("DP (ε ≤ {})", s.epsilon.map_or("?".into(), |e| super::round_up(e, 2)))
        },
        color: DP_COLOR,
        values: s.test_groups.iter().map(|g| g.metric.value()).collect(),
    }];
    if let Some(r) = &s.reference {
        // The reference's value for each of this run's groups (same test file, so same groups).
        let values = s
            .test_groups
            .iter()
            .map(|g| r.test_groups.iter().find(|x| x.group == g.group).map(|x| x.metric.value()).unwrap_or(f64::NAN))
            .collect();
        series.push(Bars { name: "non-private reference (no privacy)".into(), color: OTHER_COLOR, values });
    }
    bar_chart(&format!("held-out {metric} per group"), metric, &names, &series)
}
