//! The Prometheus exposition formats of every `/metrics` HeadCNI serves (the agent's and the
//! controller's): which one a scraper asked for by its `Accept` header ([`Exposition::negotiate`])
//! and a registry written in it ([`expose`]).
//!
//! prometheus-client writes OpenMetrics 1.0 only. The classic text format 0.0.4, which curl,
//! older scrapers and many parsers read, is derived from it ([`classic_text`]): the two differ
//! in the metadata of counters, whose `# TYPE` line names the `_total` series in the classic
//! format (a classic parser would otherwise take every counter for an untyped series).

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The two exposition formats a Prometheus scraper speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// `application/openmetrics-text; version=1.0.0`
    OpenMetrics,
    /// `text/plain; version=0.0.4`, the classic format, for any other client.
    Text,
}

impl Exposition {
    /// Picks the format from an `Accept` header by its q-values: OpenMetrics only when the
    /// client prefers it (Prometheus does), the classic format otherwise (curl, older scrapers).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut best = (0.0f32, Exposition::Text);
        let mut text_q = 0.0f32;
        for part in accept.unwrap_or_default().split(',') {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let q = params.filter_map(|p| p.strip_prefix("q=")).find_map(|v| v.parse::<f32>().ok()).unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" if q > best.0 => best = (q, Exposition::OpenMetrics),
                "text/plain" | "text/*" | "*/*" => text_q = text_q.max(q),
                _ => {}
            }
        }
        if best.1 == Exposition::OpenMetrics && best.0 >= text_q { Exposition::OpenMetrics } else { Exposition::Text }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Exposition::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// Everything in `registry`, in `format`. An encoding failure (a metric whose value cannot be
/// written) is logged and leaves what was written before it.
pub fn expose(registry: &Registry, format: Exposition) -> String {
    let mut out = String::new();
    if let Err(e) = encode(&mut out, registry) {
        log::warn!("encoding metrics: {e}");
    }
    match format {
        Exposition::OpenMetrics => out,
        Exposition::Text => classic_text(&out),
    }
}

/// The classic text format of an OpenMetrics exposition: the `# TYPE` and `# HELP` lines of a
/// counter name its `_total` series, `# UNIT` and `# EOF` go, the samples stay as they are.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# TYPE ")
            .map(|r| ("# TYPE ", r))
            .or(line.strip_prefix("# HELP ").map(|r| ("# HELP ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{kind}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    #[test]
    fn prometheus_gets_openmetrics_and_every_other_client_the_classic_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Exposition::negotiate(Some(prometheus)), Exposition::OpenMetrics);
        assert_eq!(Exposition::negotiate(Some("application/openmetrics-text")), Exposition::OpenMetrics);
        for classic in [
            None,
            Some(""),
            Some("*/*"),
            Some("text/plain;version=0.0.4"),
            Some("text/plain,application/openmetrics-text;q=0.5"),
            Some("application/json"),
        ] {
            assert_eq!(Exposition::negotiate(classic), Exposition::Text, "{classic:?}");
        }
    }

    #[test]
    fn the_classic_text_types_the_total_series_of_counters() {
        let mut registry = Registry::with_prefix("x");
        let counter = Counter::<u64>::default();
        let gauge = Gauge::<i64>::default();
        registry.register("requests", "Requests", counter.clone());
        registry.register("open", "Open things", gauge.clone());
        counter.inc_by(3);
        gauge.set(2);
        let om = expose(&registry, Exposition::OpenMetrics);
        assert!(om.contains("# TYPE x_requests counter\n") && om.ends_with("# EOF\n"), "{om}");
        let text = expose(&registry, Exposition::Text);
        assert!(text.contains("# TYPE x_requests_total counter\n"), "{text}");
        assert!(text.contains("# HELP x_requests_total Requests"), "{text}");
        assert!(text.contains("\nx_requests_total 3\n"), "{text}");
        assert!(text.contains("# TYPE x_open gauge\n") && text.contains("\nx_open 2\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# TYPE x_requests counter"), "{text}");
        // Every sample keeps its line; only the metadata of counters is renamed.
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(samples(&om), samples(&text));
    }
}
