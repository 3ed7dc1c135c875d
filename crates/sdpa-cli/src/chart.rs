//! `sdpa chart`: TFLOP/s against sequence length, one line a backend, from the JSON of
//! `sdpa bench --sweep` (ours) and `ci/bench_torch_sweep.py` (PyTorch's), one SVG per
//! pass, head dim and causal setting, laid out like FlashAttention's README charts.

use crate::error::CliError;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One measured point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `sdpa flash`, `torch cudnn`, ...
    pub series: String,
    /// `forward` or `backward`.
    pub pass: String,
    /// Head dim.
    pub head_dim: u64,
    /// Causal.
    pub causal: bool,
    /// Element type.
    pub dtype: String,
    /// Sequence length.
    pub len: u64,
    /// TFLOP/s at the median time.
    pub tflops: f64,
    /// `B * L` and `H * E` of the point (the sweep keeps both fixed).
    pub tokens_hidden: (u64, u64),
}

/// One chart: its points by series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    /// `(pass, head dim, causal, dtype)`.
    pub key: (String, u64, bool, String),
    /// Series name -> (len, TFLOP/s), sorted by len.
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// `(B * L, H * E)` when every point has the same, for the axis label.
    pub tokens_hidden: Option<(u64, u64)>,
}

fn bad(path: &Path, what: &str) -> CliError {
    CliError::Usage(format!(
        "{}: expected the JSON of `sdpa bench --sweep` or ci/bench_torch_sweep.py ({what})",
        path.display()
    ))
}

/// The points of one sweep file and its device. Rows without a time (a backend that
/// cannot run the point) and dispatch's `auto` rows (a copy of the backend it picked)
/// are left out.
///
/// # Errors
/// A file that is not such JSON, naming it and what is missing.
pub fn points(path: &Path, text: &str) -> Result<(String, Vec<Point>), CliError> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(path, &format!("not JSON: {e}")))?;
    let source = doc["source"]
        .as_str()
        .ok_or_else(|| bad(path, "no \"source\""))?
        .to_string();
    let device = doc["device"]
        .as_str()
        .unwrap_or("unknown device")
        .to_string();
    let rows = doc["rows"]
        .as_array()
        .ok_or_else(|| bad(path, "no \"rows\" array"))?;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let field = |name: &str| bad(path, &format!("row {i} has no {name}"));
        let backend = r["backend"].as_str().ok_or_else(|| field("backend"))?;
        if backend.starts_with("auto") {
            continue;
        }
        let Some(tflops) = r["tflops"].as_f64() else {
            continue;
        };
        if !tflops.is_finite() {
            continue;
        }
        out.push(Point {
            series: format!("{source} {backend}"),
            pass: r["pass"].as_str().ok_or_else(|| field("pass"))?.to_string(),
            head_dim: r["head_dim"].as_u64().ok_or_else(|| field("head_dim"))?,
            causal: r["causal"].as_bool().ok_or_else(|| field("causal"))?,
            dtype: r["dtype"]
                .as_str()
                .ok_or_else(|| field("dtype"))?
                .to_string(),
            len: r["len"].as_u64().ok_or_else(|| field("len"))?,
            tflops,
            tokens_hidden: (
                r["batch"].as_u64().unwrap_or(0) * r["len"].as_u64().unwrap_or(0),
                r["heads"].as_u64().unwrap_or(0) * r["head_dim"].as_u64().unwrap_or(0),
            ),
        });
    }
    Ok((device, out))
}

/// The points grouped into charts, in key order.
pub fn charts(points: &[Point]) -> Vec<Chart> {
    let mut by: BTreeMap<(String, u64, bool, String), Chart> = BTreeMap::new();
    for p in points {
        let key = (p.pass.clone(), p.head_dim, p.causal, p.dtype.clone());
        let chart = by.entry(key.clone()).or_insert_with(|| Chart {
            key,
            tokens_hidden: Some(p.tokens_hidden),
            ..Chart::default()
        });
        if chart.tokens_hidden != Some(p.tokens_hidden) {
            chart.tokens_hidden = None;
        }
        chart
            .series
            .entry(p.series.clone())
            .or_default()
            .push((p.len, p.tflops));
    }
    for chart in by.values_mut() {
        for line in chart.series.values_mut() {
            line.sort_by_key(|&(len, _)| len);
            line.dedup_by_key(|&mut (len, _)| len);
        }
    }
    by.into_values().collect()
}

/// The file name of a chart: `forward-hdim128-causal-bf16.svg`.
pub fn file_name(chart: &Chart) -> String {
    let (pass, e, causal, dtype) = &chart.key;
    format!(
        "{pass}-hdim{e}-{}-{dtype}.svg",
        if *causal { "causal" } else { "noncausal" }
    )
}

fn len_label(len: u64) -> String {
    if len >= 1024 && len % 1024 == 0 {
        format!("{}k", len / 1024)
    } else {
        len.to_string()
    }
}

/// A fixed colour per series, the same in every chart: ours warm, PyTorch's cool.
fn colour(series: &str, fallback: usize) -> RGBColor {
    match series {
        "sdpa flash" => RGBColor(214, 39, 40),
        "sdpa efficient" => RGBColor(255, 127, 14),
        "sdpa math" => RGBColor(140, 86, 75),
        "torch default" => RGBColor(127, 127, 127),
        "torch flash" => RGBColor(31, 119, 180),
        "torch cudnn" => RGBColor(44, 160, 44),
        "torch efficient" => RGBColor(148, 103, 189),
        "torch math" => RGBColor(23, 190, 207),
        _ => {
            let c = Palette99::pick(fallback).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

fn plot_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> CliError + '_ {
    move |e| CliError::Usage(format!("chart {what}: drawing failed: {e:?}"))
}

/// The chart as an SVG document.
///
/// # Errors
/// A drawing failure (plotters'), naming the chart.
pub fn svg(chart: &Chart, device: &str) -> Result<String, CliError> {
    let name = file_name(chart);
    let err = plot_err(&name);
    let lens: Vec<u64> = {
        let mut l: Vec<u64> = chart
            .series
            .values()
            .flat_map(|s| s.iter().map(|&(len, _)| len))
            .collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let at = |len: u64| lens.iter().position(|&l| l == len).unwrap_or(0) as f64;
    let top = chart
        .series
        .values()
        .flat_map(|s| s.iter().map(|&(_, t)| t))
        .fold(1.0f64, f64::max);
    let (pass, e, causal, dtype) = &chart.key;
    let title = format!(
        "{} {dtype}, head dim {e}, {} ({device})",
        if pass == "backward" {
            "Backward"
        } else {
            "Forward"
        },
        if *causal { "causal" } else { "not causal" }
    );
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (960, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let n = lens.len().max(1) as f64;
        let mut plot = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(18)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..top * 1.18)
            .map_err(&err)?;
        let labels = lens.clone();
        plot.configure_mesh()
            .disable_x_mesh()
            .x_labels(lens.len().max(1))
            .x_label_formatter(&|x: &f64| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                    len_label(labels[i as usize])
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y: &f64| format!("{y:.0}"))
            .x_desc(match chart.tokens_hidden {
                Some((t, h)) if t > 0 && h > 0 => format!(
                    "sequence length (B x L = {} tokens, H x E = {h})",
                    len_label(t)
                ),
                _ => "sequence length".to_string(),
            })
            .y_desc("TFLOP/s")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(&err)?;
        for (i, (series, line)) in chart.series.iter().enumerate() {
            let c = colour(series, i);
            let pts: Vec<(f64, f64)> = line.iter().map(|&(len, t)| (at(len), t)).collect();
            plot.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(&err)?
                .label(series.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            plot.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(&err)?;
            plot.draw_series(pts.iter().map(|&(x, y)| {
                Text::new(
                    format!("{y:.0}"),
                    (x + 0.04, y + top * 0.012),
                    ("sans-serif", 12).into_font().color(&c),
                )
            }))
            .map_err(&err)?;
        }
        plot.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(text)
}

/// `sdpa chart FILES.. --out DIR`: every chart of the files' points into DIR (created if
/// missing; each file written atomically). Returns the paths written.
///
/// # Errors
/// An unreadable or malformed input (named), no timed point in any of them, a refused
/// or failed write.
pub fn run(inputs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>, CliError> {
    let mut all = Vec::new();
    let mut devices: Vec<String> = Vec::new();
    for path in inputs {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("{}: cannot read: {e}", path.display())))?;
        let (device, pts) = points(path, &text)?;
        devices.push(device);
        all.extend(pts);
    }
    if all.is_empty() {
        return Err(CliError::Usage(
            "chart: expected at least one timed point in the inputs, got none".to_string(),
        ));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| CliError::Usage(format!("{}: cannot create: {e}", out.display())))?;
    let device = device_title(&devices);
    let sources: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let mut written = Vec::new();
    for chart in charts(&all) {
        let target = out.join(file_name(&chart));
        crate::output::write(&target, svg(&chart, &device)?.as_bytes(), &sources)?;
        written.push(target);
    }
    Ok(written)
}

/// The inputs' device names for a chart's title: each once, and one that another
/// contains (PyTorch's "NVIDIA H200" beside ours "cuda (NVIDIA H200, sm_90)") left out.
fn device_title(devices: &[String]) -> String {
    let mut kept: Vec<&str> = Vec::new();
    for d in devices {
        let inside_another = devices.iter().any(|o| o != d && o.contains(d.as_str()));
        if !inside_another && !kept.contains(&d.as_str()) {
            kept.push(d);
        }
    }
    kept.join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_named_inside_another_is_named_once() {
        let d = |v: &[&str]| device_title(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            d(&["cuda (NVIDIA H200, sm_90)", "NVIDIA H200"]),
            "cuda (NVIDIA H200, sm_90)"
        );
        assert_eq!(
            d(&["NVIDIA H200", "cuda (NVIDIA H200, sm_90)"]),
            "cuda (NVIDIA H200, sm_90)"
        );
        assert_eq!(d(&["cpu", "NVIDIA H100"]), "cpu / NVIDIA H100");
        assert_eq!(d(&["a", "a"]), "a");
    }

    const OURS: &str = r#"{"device": "NVIDIA H200", "source": "sdpa", "rows": [
      {"backend": "auto (flash)", "pass": "forward", "head_dim": 64, "causal": false, "dtype": "bf16", "len": 512, "tflops": 300.0},
      {"backend": "flash", "pass": "forward", "head_dim": 64, "causal": false, "dtype": "bf16", "len": 1024, "tflops": 310.0},
      {"backend": "flash", "pass": "forward", "head_dim": 64, "causal": false, "dtype": "bf16", "len": 512, "tflops": 300.0},
      {"backend": "math", "pass": "forward", "head_dim": 64, "causal": false, "dtype": "bf16", "len": 512, "unavailable": "too large"},
      {"backend": "flash", "pass": "forward", "head_dim": 64, "causal": true, "dtype": "bf16", "len": 512, "tflops": 200.0}
    ]}"#;

    #[test]
    fn groups_points_into_charts_and_skips_untimed_rows() {
        let (device, pts) = points(Path::new("ours.json"), OURS).unwrap();
        assert_eq!(device, "NVIDIA H200");
        assert_eq!(pts.len(), 3, "auto and untimed rows dropped");
        let charts = charts(&pts);
        assert_eq!(charts.len(), 2);
        assert_eq!(
            charts[0].series["sdpa flash"],
            vec![(512, 300.0), (1024, 310.0)]
        );
        assert_eq!(file_name(&charts[0]), "forward-hdim64-noncausal-bf16.svg");
        assert_eq!(file_name(&charts[1]), "forward-hdim64-causal-bf16.svg");
        let svg = svg(&charts[0], &device).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("sdpa flash") && svg.contains("1k"));
        assert!(svg.contains("TFLOP/s") && svg.contains("310"));
    }

    #[test]
    fn malformed_input_names_the_file_and_the_field() {
        let e = points(Path::new("x.json"), "[1, 2]")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.json: expected the JSON") && e.contains("source"),
            "{e}"
        );
        let e = points(
            Path::new("y.json"),
            r#"{"source": "sdpa", "rows": [{"backend": "flash", "tflops": 1.0}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("row 0 has no pass"), "{e}");
    }
}
