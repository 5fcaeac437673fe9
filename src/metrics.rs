//! Prometheus metrics: `replog serve SITE --metrics ADDR` answers `GET /metrics` on
//! ADDR with the OpenMetrics text format.
//!
//! Per machine (label `machine`), taken from the status `serve` works out four times a
//! second:
//!
//! | name | type | what |
//! |---|---|---|
//! | `replog_machine_lag_seconds` | gauge | replication lag (primaries) or age of the newest point (replicas) |
//! | `replog_machine_health` | gauge | 0 healthy, 1 warning, 2 critical |
//! | `replog_machine_journal_bytes` | gauge | bytes in the machine's journal |
//! | `replog_machine_journal_spare_bytes` | gauge | bytes of merged segments kept to be written again |
//! | `replog_machine_acked_lsn` | gauge | newest LSN the target acknowledged |
//! | `replog_machine_resync_progress_ratio` | gauge | chunks compared / all, of the resync under way or last |
//! | `replog_machine_rpo_seconds` | gauge | the RPO set with `protect --rpo` (lag beyond it: warning; twice: critical) |
//! | `replog_machine_paused` | gauge | 1 while shipping is paused by `replog pause` (primaries), else 0 |
//!
//! Counted as it happens:
//!
//! | name | type | what |
//! |---|---|---|
//! | `replog_shipped_bytes_total{machine}` | counter | journal bytes shipped and acknowledged |
//! | `replog_shipped_segments_total{machine}` | counter | segments shipped and acknowledged |
//! | `replog_retries_total{machine}` | counter | shipping passes that failed in passing (retried on the schedule) |
//! | `replog_failovers_total{machine, kind}` | counter | failovers carried out here (planned, unplanned, test) |
//! | `replog_fuse_request_duration_seconds{op}` | histogram | FUSE requests (read, write, fsync, flush, …) |
//! | `replog_fsync_duration_seconds` | histogram | fsync/fdatasync of a disk through the mount |
//! | `replog_tls_sessions_total{direction}` | counter | TLS sessions accepted (`in`) and opened (`out`) |
//! | `replog_replica_store_requests_total` | counter | requests to an S3 replica store |
//! | `replog_direct_read_bytes_total{source}` | counter | parent bytes read around the page cache for O_DIRECT openers (their sequential runs; every read with `serve --direct-reads`): from the read-ahead (`read_ahead`) or the disk at the request (`disk`) |

use crate::protection::status::SiteStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MachineLabel {
    pub machine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabel {
    pub machine: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Latency buckets: 10 µs to about 10 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 4.0, 11))
}

/// Every metric of this process (one site's `serve`).
pub struct Metrics {
    registry: Registry,
    lag: Family<MachineLabel, FloatGauge>,
    health: Family<MachineLabel, Gauge>,
    paused: Family<MachineLabel, Gauge>,
    journal: Family<MachineLabel, Gauge>,
    spare: Family<MachineLabel, Gauge>,
    acked: Family<MachineLabel, Gauge>,
    resync: Family<MachineLabel, FloatGauge>,
    rpo: Family<MachineLabel, FloatGauge>,
    pub shipped_bytes: Family<MachineLabel, Counter>,
    pub shipped_segments: Family<MachineLabel, Counter>,
    pub retries: Family<MachineLabel, Counter>,
    pub failovers: Family<FailoverLabel, Counter>,
    pub fuse: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub fsync: Histogram,
    pub tls_sessions: Family<DirectionLabel, Counter>,
    pub store_requests: Counter,
    direct_reads: Family<SourceLabel, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("replog");
        let m = Metrics {
            registry: Registry::default(),
            lag: Family::default(),
            health: Family::default(),
            paused: Family::default(),
            journal: Family::default(),
            spare: Family::default(),
            acked: Family::default(),
            resync: Family::default(),
            rpo: Family::default(),
            shipped_bytes: Family::default(),
            shipped_segments: Family::default(),
            retries: Family::default(),
            failovers: Family::default(),
            fuse: Family::new_with_constructor(latency as fn() -> Histogram),
            fsync: latency(),
            tls_sessions: Family::default(),
            store_requests: Counter::default(),
            direct_reads: Family::default(),
        };
        registry.register(
            "machine_lag_seconds",
            "Replication lag of a primary, or the age of a replica's newest point",
            m.lag.clone(),
        );
        registry.register(
            "machine_health",
            "Health: 0 healthy, 1 warning, 2 critical",
            m.health.clone(),
        );
        registry.register(
            "machine_paused",
            "Shipping paused by an operator (replog pause): 1, else 0",
            m.paused.clone(),
        );
        registry.register(
            "machine_journal_bytes",
            "Bytes in the machine's change journal",
            m.journal.clone(),
        );
        registry.register(
            "machine_journal_spare_bytes",
            "Bytes of merged journal segments kept to be written again",
            m.spare.clone(),
        );
        registry.register(
            "machine_acked_lsn",
            "Newest LSN the target acknowledged",
            m.acked.clone(),
        );
        registry.register(
            "machine_resync_progress_ratio",
            "Chunks compared of all, of the resync under way or last finished",
            m.resync.clone(),
        );
        registry.register(
            "machine_rpo_seconds",
            "The machine's recovery point objective: lag beyond it is a warning, beyond \
             twice it critical",
            m.rpo.clone(),
        );
        registry.register(
            "shipped_bytes",
            "Journal bytes shipped and acknowledged",
            m.shipped_bytes.clone(),
        );
        registry.register(
            "shipped_segments",
            "Journal segments shipped and acknowledged",
            m.shipped_segments.clone(),
        );
        registry.register(
            "retries",
            "Shipping passes that failed in passing and were retried",
            m.retries.clone(),
        );
        registry.register(
            "failovers",
            "Failovers carried out at this site",
            m.failovers.clone(),
        );
        registry.register(
            "fuse_request_duration_seconds",
            "FUSE requests, by operation",
            m.fuse.clone(),
        );
        registry.register(
            "fsync_duration_seconds",
            "fsync and fdatasync of a disk through the mount",
            m.fsync.clone(),
        );
        registry.register(
            "tls_sessions",
            "TLS sessions accepted (in) and opened (out)",
            m.tls_sessions.clone(),
        );
        registry.register(
            "replica_store_requests",
            "Requests to an S3 replica store",
            m.store_requests.clone(),
        );
        registry.register(
            "direct_read_bytes",
            "Parent bytes read around the page cache for O_DIRECT openers, by source: \
             the read-ahead (read_ahead) or the disk at the request (disk)",
            m.direct_reads.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Take the per-machine gauges from a status document (machines gone since the
    /// last one go from the gauges too).
    pub fn observe_status(&self, doc: &SiteStatus) {
        self.lag.clear();
        self.health.clear();
        self.paused.clear();
        self.journal.clear();
        self.spare.clear();
        self.acked.clear();
        self.resync.clear();
        self.rpo.clear();
        for m in &doc.machines {
            let l = MachineLabel {
                machine: m.name.clone(),
            };
            if let Some(lag) = m.lag_seconds {
                self.lag.get_or_create(&l).set(lag);
            }
            if let Some(rpo) = m.rpo_seconds {
                self.rpo.get_or_create(&l).set(rpo);
            }
            let health = match m.health {
                crate::protection::Health::Healthy => 0,
                crate::protection::Health::Warning => 1,
                crate::protection::Health::Critical => 2,
            };
            self.health.get_or_create(&l).set(health);
            self.paused.get_or_create(&l).set(i64::from(m.paused));
            self.journal
                .get_or_create(&l)
                .set(i64::try_from(m.journal_bytes).unwrap_or(i64::MAX));
            self.spare
                .get_or_create(&l)
                .set(i64::try_from(m.journal_spare_bytes).unwrap_or(i64::MAX));
            if let Some(a) = m.acked_lsn {
                self.acked
                    .get_or_create(&l)
                    .set(i64::try_from(a).unwrap_or(i64::MAX));
            }
            if let Some(r) = &m.resync {
                if r.chunks_total > 0 {
                    self.resync
                        .get_or_create(&l)
                        .set(r.chunks_compared as f64 / r.chunks_total as f64);
                }
            }
        }
    }

    /// One FUSE request of `op` that took `took`.
    pub fn fuse_request(&self, op: &'static str, took: Duration) {
        self.fuse
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
        if op == "fsync" {
            self.fsync.observe(took.as_secs_f64());
        }
    }

    /// A direct read of `all` parent bytes, `hit` of them from the read-ahead.
    pub fn read_ahead(&self, hit: u64, all: u64) {
        for (source, n) in [("read_ahead", hit), ("disk", all.saturating_sub(hit))] {
            if n > 0 {
                self.direct_reads
                    .get_or_create(&SourceLabel { source })
                    .inc_by(n);
            }
        }
    }

    /// A guard that counts one FUSE request of `op` when dropped.
    pub fn timed(&self, op: &'static str) -> Timed {
        Timed {
            op,
            at: std::time::Instant::now(),
        }
    }

    pub fn machine(&self, name: &str) -> MachineLabel {
        MachineLabel {
            machine: name.to_string(),
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// See [`Metrics::timed`].
pub struct Timed {
    op: &'static str,
    at: std::time::Instant,
}

impl Drop for Timed {
    fn drop(&mut self) {
        get().fuse_request(self.op, self.at.elapsed());
    }
}

/// Answer `GET /metrics` on `addr` (a thread per server; each request handled in
/// turn, with a short timeout), taking the per-machine gauges from `status` first.
pub fn serve(
    addr: &str,
    status: impl Fn() -> Option<SiteStatus> + Send + 'static,
) -> crate::Result<std::net::SocketAddr> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(addr).map_err(|e| crate::Error::Net {
        op: "listen for metrics on",
        peer: addr.to_string(),
        source: e,
    })?;
    let local = listener.local_addr().map_err(|e| crate::Error::Net {
        op: "listen for metrics on",
        peer: addr.to_string(),
        source: e,
    })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let Ok(reader) = conn.try_clone() else { continue };
                let mut reader = BufReader::new(reader);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the request's head.
                loop {
                    let mut h = String::new();
                    match reader.read_line(&mut h) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if h.trim().is_empty() => break,
                        Ok(_) => {}
                    }
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status_line, ctype, body) = if method == "GET"
                    && (path == "/metrics" || path.starts_with("/metrics?"))
                {
                    if let Some(doc) = status() {
                        get().observe_status(&doc);
                    }
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        get().encode(),
                    )
                } else {
                    ("404 Not Found", "text/plain", "only /metrics here\n".into())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status_line}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| crate::Error::io("spawn", std::path::Path::new("metrics"), e))?;
    Ok(local)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_metric_with_its_labels() {
        let m = get();
        m.shipped_bytes
            .get_or_create(&m.machine("vm1"))
            .inc_by(4096);
        m.fuse_request("fsync", Duration::from_millis(3));
        let text = m.encode();
        for name in [
            "replog_shipped_bytes_total{machine=\"vm1\"} 4096",
            "replog_fuse_request_duration_seconds_count{op=\"fsync\"} 1",
            "replog_fsync_duration_seconds_count 1",
            "# TYPE replog_replica_store_requests counter",
        ] {
            assert!(text.contains(name), "{name} not in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // Per-machine gauges come from a status document, and go with it.
        let mut vm1: crate::protection::status::MachineStatus = serde_json::from_value(
            serde_json::json!({"name": "vm1", "role": "primary", "state": "protected",
                "generation": 1, "health": "warning", "reason": "shipping to b:7000 is paused",
                "lag_seconds": null, "journal_bytes": 0, "progress": null, "last_point": null,
                "target": "b:7000", "acked_lsn": 0, "last_lsn": 0, "paused": true}),
        )
        .unwrap();
        let doc = |machines| SiteStatus {
            site: String::new(),
            machines,
            as_of_ns: 0,
            warnings: Vec::new(),
        };
        m.observe_status(&doc(vec![vm1.clone()]));
        let text = m.encode();
        assert!(
            text.contains("replog_machine_paused{machine=\"vm1\"} 1"),
            "{text}"
        );
        vm1.paused = false;
        m.observe_status(&doc(vec![vm1]));
        assert!(m
            .encode()
            .contains("replog_machine_paused{machine=\"vm1\"} 0"));
        m.health.get_or_create(&m.machine("gone")).set(2);
        m.observe_status(&SiteStatus {
            site: String::new(),
            machines: Vec::new(),
            as_of_ns: 0,
            warnings: Vec::new(),
        });
        assert!(!m.encode().contains("replog_machine_health{"));
    }
}
