//! A small op profiler: named events with start and duration, summarised like
//! PyTorch's `key_averages()` and exported as a Chrome trace (chrome://tracing,
//! Perfetto).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

/// One timed op.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Op or kernel name (`c_attn`, `sdpa.math`, ...).
    pub name: String,
    /// `cpu` or `cuda`.
    pub device: &'static str,
    /// Microseconds since the profiler started.
    pub start_us: f64,
    /// Duration in microseconds.
    pub dur_us: f64,
}

/// Collects events when enabled; a disabled profiler costs one branch per op.
#[derive(Debug)]
pub struct Profiler {
    enabled: bool,
    origin: Instant,
    events: Vec<Event>,
}

impl Default for Profiler {
    fn default() -> Self {
        Profiler::disabled()
    }
}

impl Profiler {
    /// A profiler that records.
    pub fn enabled() -> Self {
        Profiler {
            enabled: true,
            origin: Instant::now(),
            events: Vec::new(),
        }
    }

    /// A profiler that records nothing.
    pub fn disabled() -> Self {
        Profiler {
            enabled: false,
            origin: Instant::now(),
            events: Vec::new(),
        }
    }

    /// Runs `f`, recording its wall time as a CPU op named `name`.
    pub fn cpu<R>(&mut self, name: &str, f: impl FnOnce() -> R) -> R {
        if !self.enabled {
            return f();
        }
        let start = Instant::now();
        let r = f();
        let end = Instant::now();
        self.events.push(Event {
            name: name.to_string(),
            device: "cpu",
            start_us: start.duration_since(self.origin).as_secs_f64() * 1e6,
            dur_us: end.duration_since(start).as_secs_f64() * 1e6,
        });
        r
    }

    /// Microseconds since the profiler started.
    pub fn now_us(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1e6
    }

    /// Records an event measured elsewhere (e.g. between two CUDA events).
    pub fn record(&mut self, event: Event) {
        if self.enabled {
            self.events.push(event);
        }
    }

    /// Everything recorded so far.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Per-name totals, sorted by total time: what `key_averages().table()` shows.
    pub fn summary(&self) -> Vec<Summary> {
        let mut by_name: BTreeMap<(&str, &str), (usize, f64)> = BTreeMap::new();
        for e in &self.events {
            let entry = by_name.entry((e.name.as_str(), e.device)).or_default();
            entry.0 += 1;
            entry.1 += e.dur_us;
        }
        // Shares are of the time the outermost events cover, so an op nested in a
        // recorded parent (an op inside `forward`) is not counted twice.
        let mut spans: Vec<(f64, f64)> = self
            .events
            .iter()
            .map(|e| (e.start_us, e.start_us + e.dur_us))
            .collect();
        spans.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut all = 0.0;
        let mut covered_until = f64::NEG_INFINITY;
        for (start, end) in spans {
            if start >= covered_until {
                all += end - start;
                covered_until = end;
            } else if end > covered_until {
                all += end - covered_until;
                covered_until = end;
            }
        }
        let mut rows: Vec<Summary> = by_name
            .into_iter()
            .map(|((name, device), (calls, total_us))| Summary {
                name: name.to_string(),
                device,
                calls,
                total_us,
                mean_us: total_us / calls as f64,
                share: if all > 0.0 { total_us / all } else { 0.0 },
            })
            .collect();
        rows.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        rows
    }

    /// The summary as an aligned table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<28} {:>6} {:>7} {:>14} {:>12} {:>7}\n",
            "name", "device", "calls", "total", "mean", "share"
        );
        for r in self.summary() {
            let _ = writeln!(
                out,
                "{:<28} {:>6} {:>7} {:>11.3} ms {:>9.1} us {:>6.1}%",
                r.name,
                r.device,
                r.calls,
                r.total_us / 1e3,
                r.mean_us,
                r.share * 100.0
            );
        }
        out
    }

    /// A Chrome trace (JSON array format of the Trace Event Format): one complete
    /// (`"ph": "X"`) event per op, CPU ops on thread 1, CUDA kernels on thread 2.
    pub fn chrome_trace(&self) -> String {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|e| {
                format!(
                    "{{\"name\":{},\"cat\":\"{}\",\"ph\":\"X\",\"ts\":{:.3},\"dur\":{:.3},\"pid\":1,\"tid\":{}}}",
                    json_string(&e.name),
                    e.device,
                    e.start_us,
                    e.dur_us,
                    if e.device == "cpu" { 1 } else { 2 }
                )
            })
            .collect();
        format!(
            "{{\"traceEvents\":[\n{}\n],\"displayTimeUnit\":\"ms\"}}\n",
            events.join(",\n")
        )
    }
}

fn json_string(s: &str) -> String {
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

/// One row of [`Profiler::summary`].
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Op name.
    pub name: String,
    /// `cpu` or `cuda`.
    pub device: &'static str,
    /// Number of calls.
    pub calls: usize,
    /// Total microseconds.
    pub total_us: f64,
    /// Mean microseconds per call.
    pub mean_us: f64,
    /// Fraction of the time covered by the outermost events.
    pub share: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_trace() {
        let mut p = Profiler::enabled();
        for _ in 0..3 {
            p.cpu("a", || {
                std::thread::sleep(std::time::Duration::from_millis(2))
            });
        }
        p.cpu("b\"q", || ());
        let s = p.summary();
        assert_eq!(s[0].name, "a");
        assert_eq!(s[0].calls, 3);
        assert!(s[0].total_us >= 6000.0);
        assert!((s.iter().map(|r| r.share).sum::<f64>() - 1.0).abs() < 1e-9);
        // A parent around two children: the parent's share is 100%, not 50%.
        let mut nested = Profiler::enabled();
        for (name, start, dur) in [("parent", 0.0, 10.0), ("a", 1.0, 4.0), ("b", 5.0, 5.0)] {
            nested.record(Event {
                name: name.into(),
                device: "cpu",
                start_us: start,
                dur_us: dur,
            });
        }
        let s = nested.summary();
        assert_eq!((s[0].name.as_str(), s[0].share), ("parent", 1.0));
        assert_eq!(s[1].share, 0.5);
        let trace = p.chrome_trace();
        assert!(trace.contains("\"name\":\"b\\\"q\""));
        assert_eq!(trace.matches("\"ph\":\"X\"").count(), 4);
        let mut off = Profiler::disabled();
        assert_eq!(off.cpu("x", || 7), 7);
        assert!(off.events().is_empty());
    }
}
