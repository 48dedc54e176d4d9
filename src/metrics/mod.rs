//! Prometheus metrics, the part both binaries share: the text exposition
//! format (on `prometheus-client`) and the HTTP endpoint ([`http`], on
//! `hyper`). What each binary reports lives with it: meshd's in
//! [`crate::control::metrics`], mesh-rendezvous's in
//! [`crate::rendezvous::metrics`]. This module depends on neither.
//!
//! The format is Prometheus's text format 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>), written
//! by `prometheus-client`'s `prometheus_text` encoder: for each family a
//! `# HELP` and a `# TYPE` line, then its samples `name{label="value",…}
//! value`, label values escaped. Names follow Prometheus's conventions: a
//! `meshd_` or `mesh_rendezvous_` prefix, the unit in the name, `_total` on
//! counters. A family is always listed; a sample that has no value yet (no
//! handshake, no RTT measured) is left out rather than reported as zero.
//!
//! Pure but for [`http`]: a scrape is a snapshot (what the API shows) turned
//! into text by a [`Collector`], fixed input, fixed text.

pub mod http;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use http::{MetricsError, MetricsServer};

/// The media type of the text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A metric family's type, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A sample's value: counts print exactly, measurements as floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(u64::try_from(v).unwrap_or(u64::MAX))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

/// No labels, for a family's single sample.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// Writes one family: its `# HELP` and `# TYPE` lines, then one sample per
/// item of `samples` (none at all is a family listed without a value).
/// `name` is the full name as it appears in the text, `_total` included
/// for a counter.
pub fn family<L: EncodeLabelSet>(
    out: &mut DescriptorEncoder<'_>,
    name: &str,
    kind: Kind,
    help: &str,
    samples: impl IntoIterator<Item = (L, Value)>,
) -> std::fmt::Result {
    let (name, metric_type) = match kind {
        // The encoder appends `_total` to a counter's name itself.
        Kind::Counter => (
            name.strip_suffix("_total").unwrap_or(name),
            MetricType::Counter,
        ),
        Kind::Gauge => (name, MetricType::Gauge),
    };
    let mut family = out.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        let sample = family.encode_family(&labels)?;
        match (kind, value) {
            (Kind::Counter, Value::Int(v)) => ConstCounter::new(v).encode(sample)?,
            (Kind::Counter, Value::Float(v)) => ConstCounter::new(v).encode(sample)?,
            (Kind::Gauge, Value::Int(v)) => ConstGauge::new(v).encode(sample)?,
            (Kind::Gauge, Value::Float(v)) => ConstGauge::new(v).encode(sample)?,
        }
    }
    Ok(())
}

/// The text of one scrape: what `collector` writes, in the text format.
pub fn render(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    // Writing into a String cannot fail, nor can our collectors.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// Scrapes as Prometheus reads them, by an independent parser
/// (`openmetrics-parser`'s reader of the 0.0.4 text format), for tests.
#[cfg(test)]
pub(crate) mod scrape {
    use openmetrics_parser::{MetricNumber, PrometheusValue};

    /// A parsed scrape.
    pub struct Scrape {
        pub text: String,
        pub exposition: openmetrics_parser::MetricsExposition<
            openmetrics_parser::PrometheusType,
            PrometheusValue,
        >,
    }

    /// Parses `text`; panics, with the text, where it is not the format.
    pub fn parse(text: &str) -> Scrape {
        let exposition = openmetrics_parser::prometheus::parse_prometheus(text)
            .unwrap_or_else(|e| panic!("not the text format: {e:?}\n{text}"));
        Scrape {
            text: text.to_owned(),
            exposition,
        }
    }

    impl Scrape {
        /// The value of the one sample of `name` whose labels include
        /// `labels`; `None` if there is none, a panic if there are several.
        pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            let family = self.exposition.families.get(name)?;
            let mut matching = family.iter_samples().filter(|s| {
                let set = s.get_labelset().expect("a sample of a family");
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            });
            let found = matching.next().map(|s| number(&s.value));
            assert!(
                matching.next().is_none(),
                "several samples of {name} match {labels:?}:\n{}",
                self.text
            );
            found
        }

        /// Every sample of `name`: its labels and value.
        pub fn samples(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
            let Some(family) = self.exposition.families.get(name) else {
                return Vec::new();
            };
            family
                .iter_samples()
                .map(|s| {
                    let set = s.get_labelset().expect("a sample of a family");
                    let labels = set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    (labels, number(&s.value))
                })
                .collect()
        }
    }

    fn number(value: &PrometheusValue) -> f64 {
        let n: &MetricNumber = match value {
            PrometheusValue::Counter(c) => &c.value,
            PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n,
            other => panic!("only counters and gauges are exposed, not {other:?}"),
        };
        n.as_f64()
    }
}
