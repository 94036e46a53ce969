//! Metric names and the Prometheus exporter. Recording goes through the `metrics` facade: with
//! no exporter installed (tests, embedding) every record is a no-op.

use carerecord_proto::SourceOutcome;
use metrics_exporter_prometheus::PrometheusHandle;

/// Lookups answered, by `outcome` (`complete`, `partial`, `denied`, `invalid`, `shed`, `unavailable`).
pub const LOOKUPS: &str = "carerecord_lookups_total";
/// Lookup latency in seconds, by `cache` (`hit`, `miss`).
pub const LOOKUP_DURATION: &str = "carerecord_lookup_duration_seconds";
/// Lookups being answered now.
pub const IN_FLIGHT: &str = "carerecord_lookups_in_flight";
/// Lookups refused because too many were in flight.
pub const SHED: &str = "carerecord_lookups_shed_total";
/// Source calls by `source` and `outcome`.
pub const SOURCE_REQUESTS: &str = "carerecord_source_requests_total";
/// Source latency in seconds, by `source`.
pub const SOURCE_DURATION: &str = "carerecord_source_duration_seconds";
/// Circuit breaker state by `source`: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "carerecord_breaker_state";
/// Cache hits and misses.
pub const CACHE_HITS: &str = "carerecord_cache_hits_total";
pub const CACHE_MISSES: &str = "carerecord_cache_misses_total";
/// Records and bytes held by the cache.
pub const CACHE_ENTRIES: &str = "carerecord_cache_entries";
pub const CACHE_BYTES: &str = "carerecord_cache_weight_bytes";
/// Lookups that joined a fan-out already in progress instead of starting one.
pub const COALESCED: &str = "carerecord_lookups_coalesced_total";
/// Access denials by `reason`.
pub const DENIED: &str = "carerecord_access_denied_total";

/// Installs the process-wide Prometheus recorder; the ops listener renders it at `/metrics`.
/// Once per process (a second call is an error).
pub fn install() -> Result<PrometheusHandle, String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// Lower-case label for a source outcome (the contract's own table).
pub fn outcome_label(outcome: SourceOutcome) -> &'static str {
    outcome.labels().1
}
