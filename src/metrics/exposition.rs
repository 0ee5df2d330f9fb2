//! The Prometheus text exposition format, version 0.0.4: `# HELP` and
//! `# TYPE` lines, samples with escaped label values, histograms as
//! cumulative `_bucket{le=...}` series plus `_sum` and `_count`. A writer over
//! a `String`; knows nothing of agents or of what is measured.
//!
//! Callers must write each family's samples right after its header (the
//! format requires a family to be contiguous); `render` does.

use std::fmt::Write as _;

use super::HistogramSnapshot;

/// What the `Content-Type` of a scrape answer says.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A sample value: integers are written exactly, floats in the format's
/// spelling (`+Inf`, `-Inf`, `NaN`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(u64),
    Float(f64),
}

impl From<u64> for Number {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<u32> for Number {
    fn from(v: u32) -> Self {
        Self::Int(u64::from(v))
    }
}

impl From<bool> for Number {
    fn from(v: bool) -> Self {
        Self::Int(u64::from(v))
    }
}

impl From<f64> for Number {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        // Rust's shortest round-trip form, never exponent notation.
        let _ = write!(out, "{v}");
    }
}

fn write_number(out: &mut String, v: Number) {
    match v {
        Number::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Number::Float(f) => write_float(out, f),
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `# HELP` text: backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// True for a valid metric or label name (`[a-zA-Z_:][a-zA-Z0-9_:]*`; label
/// names may not use `:` but ours never do).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        debug_assert!(valid_name(name), "metric name {name:?}");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Number>) {
        self.out.push_str(name);
        self.labels(labels, None);
        self.out.push(' ');
        write_number(&mut self.out, value.into());
        self.out.push('\n');
    }

    /// One histogram series: cumulative buckets ending in `+Inf`, then
    /// `_sum` and `_count` (which equals the `+Inf` bucket).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, count) in h.counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(*count);
            let mut le = String::new();
            match h.bounds.get(i) {
                Some(bound) => write_float(&mut le, *bound),
                None => le.push_str("+Inf"),
            }
            self.out.push_str(&bucket);
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            debug_assert!(valid_name(key) && !key.contains(':'), "label name {key:?}");
            if !first {
                self.out.push(',');
            }
            first = false;
            let _ = write!(self.out, "{key}=\"{}\"", escape_label_value(value));
        }
        self.out.push('}');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let cases = [
            ("plain", "plain"),
            ("", ""),
            ("a\"b", "a\\\"b"),
            ("back\\slash", "back\\\\slash"),
            ("two\nlines", "two\\nlines"),
            ("\\n is not a newline", "\\\\n is not a newline"),
            ("tab\tstays", "tab\tstays"),
            ("ünïcode", "ünïcode"),
        ];
        for (raw, want) in cases {
            assert_eq!(escape_label_value(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn numbers_are_spelled_as_the_format_wants() {
        let cases: &[(Number, &str)] = &[
            (Number::Int(0), "0"),
            (Number::Int(u64::MAX), "18446744073709551615"),
            (Number::Float(0.0), "0"),
            (Number::Float(1.0), "1"),
            (Number::Float(0.0005), "0.0005"),
            (Number::Float(1.5e-7), "0.00000015"),
            (Number::Float(f64::INFINITY), "+Inf"),
            (Number::Float(f64::NEG_INFINITY), "-Inf"),
            (Number::Float(f64::NAN), "NaN"),
        ];
        for (n, want) in cases {
            let mut out = String::new();
            write_number(&mut out, *n);
            assert_eq!(out, *want, "{n:?}");
        }
    }

    #[test]
    fn a_family_with_samples() {
        let mut e = Exposition::new();
        e.family(
            "x_total",
            MetricType::Counter,
            "Things.\nWith a \\ in help.",
        );
        e.sample("x_total", &[("agent", "a\"b"), ("kind", "in")], 3u64);
        e.sample("x_total", &[], 0.25);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\\nWith a \\\\ in help.\n\
             # TYPE x_total counter\n\
             x_total{agent=\"a\\\"b\",kind=\"in\"} 3\n\
             x_total 0.25\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let snap = HistogramSnapshot {
            bounds: &[0.005, 0.1, 1.0],
            counts: vec![2, 0, 3, 1],
            sum_seconds: 4.5,
        };
        let mut e = Exposition::new();
        e.family("lat_seconds", MetricType::Histogram, "Latency.");
        e.histogram("lat_seconds", &[("agent", "a")], &snap);
        assert_eq!(
            e.finish(),
            "# HELP lat_seconds Latency.\n\
             # TYPE lat_seconds histogram\n\
             lat_seconds_bucket{agent=\"a\",le=\"0.005\"} 2\n\
             lat_seconds_bucket{agent=\"a\",le=\"0.1\"} 2\n\
             lat_seconds_bucket{agent=\"a\",le=\"1\"} 5\n\
             lat_seconds_bucket{agent=\"a\",le=\"+Inf\"} 6\n\
             lat_seconds_sum{agent=\"a\"} 4.5\n\
             lat_seconds_count{agent=\"a\"} 6\n"
        );
    }

    #[test]
    fn an_empty_histogram_still_has_every_bucket() {
        let snap = HistogramSnapshot {
            bounds: &[1.0],
            counts: vec![0, 0],
            sum_seconds: 0.0,
        };
        let mut e = Exposition::new();
        e.histogram("h", &[], &snap);
        assert_eq!(
            e.finish(),
            "h_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n"
        );
    }

    #[test]
    fn names() {
        for ok in ["a", "_a", "a:b", "supervisor_agent_tokens_total", "A1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "ä"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
