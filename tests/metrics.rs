//! `replog serve SITE --metrics ADDR`: a running serve scraped over HTTP, its text
//! parsed line by line, and the figures checked against what happened (writes and
//! fsyncs through the mount, a protected machine shipping to a target).

mod common;

use common::serve::*;
use std::time::{Duration, Instant};

#[test]
fn a_running_serve_answers_metrics_that_follow_what_it_does() {
    if !fuse_available("a_running_serve_answers_metrics_that_follow_what_it_does") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (src, dst, addr) = two_sites(tmp.path(), "32M");
    let _target = TargetServe::start(&dst, &addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let served = Served::start(&src, &tmp.path().join("mnt"), &["--metrics", &metrics]);
    let (status, body) = http_get(&metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    protect_when_listening(&src, &addr);
    for i in 0..20u64 {
        write_at(&served.disk("os"), i * 65536, &common::pattern(i, 65536));
    }
    wait_shipped(&src);
    // The gauges come from the status at each scrape; the counters as things happen.
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let (_, body) = http_get(&metrics, "/metrics");
        let m = metric_samples(&body);
        let shipped = m
            .get("replog_shipped_bytes_total{machine=\"vm1\"}")
            .copied()
            .unwrap_or(0.0);
        if shipped >= (20 * 65536) as f64 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "never shipped in the metrics:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing: {m:?}"));
    assert_eq!(v("replog_machine_health{machine=\"vm1\"}"), 0.0);
    assert!(v("replog_machine_lag_seconds{machine=\"vm1\"}") >= 0.0);
    assert!(v("replog_machine_journal_bytes{machine=\"vm1\"}") > 0.0);
    assert!(v("replog_machine_journal_spare_bytes{machine=\"vm1\"}") >= 0.0);
    assert!(v("replog_machine_acked_lsn{machine=\"vm1\"}") > 0.0);
    assert!(v("replog_shipped_segments_total{machine=\"vm1\"}") >= 1.0);
    // write_at fsyncs every write: 20 writes, 20 fsyncs at least.
    assert!(v("replog_fuse_request_duration_seconds_count{op=\"write\"}") >= 20.0);
    assert!(v("replog_fuse_request_duration_seconds_count{op=\"fsync\"}") >= 20.0);
    assert!(v("replog_fsync_duration_seconds_count") >= 20.0);
    assert!(v("replog_tls_sessions_total{direction=\"out\"}") >= 1.0);
    assert!(m.contains_key("replog_replica_store_requests_total"));
    // A machine in trouble shows in its health: the target goes away.
    drop(_target);
    for i in 0..4u64 {
        write_at(
            &served.disk("os"),
            i * 4096,
            &common::pattern(100 + i, 4096),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metric_samples(&http_get(&metrics, "/metrics").1);
        if m.get("replog_machine_health{machine=\"vm1\"}") == Some(&1.0)
            && m.get("replog_retries_total{machine=\"vm1\"}")
                .copied()
                .unwrap_or(0.0)
                >= 1.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "never warning: {m:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Anything but /metrics is not found.
    assert!(http_get(&metrics, "/other").0.contains("404"));
    assert!(served.stop().success());
}

#[test]
fn lag_beyond_the_rpo_is_a_warning_and_beyond_twice_it_critical() {
    if !fuse_available("lag_beyond_the_rpo_is_a_warning_and_beyond_twice_it_critical") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (src, dst, addr) = two_sites(tmp.path(), "32M");
    let target = TargetServe::start(&dst, &addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let served = Served::start(&src, &tmp.path().join("mnt"), &["--metrics", &metrics]);
    // A bad RPO is refused before anything is recorded.
    let bad = replog()
        .arg("protect")
        .arg(&src)
        .arg("vm1")
        .args(["--target", &addr, "--rpo", "soon"])
        .output()
        .expect("protect");
    assert_eq!(bad.status.code(), Some(1));
    protect_when_listening_with(&src, &addr, &["--rpo", "2s"]);
    write_at(&served.disk("os"), 0, &common::pattern(1, 4096));
    let st = wait_for(&src, "healthy", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    assert_eq!(st["machines"][0]["rpo_seconds"], 2.0);
    // The target goes; writes go on; the lag grows past 2 s, then past 4 s.
    drop(target);
    let os = served.disk("os");
    let writer = std::thread::spawn(move || {
        for i in 0..60u64 {
            write_at(&os, (i % 64) * 4096, &common::pattern(10 + i, 4096));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    wait_for(&src, "warning for the RPO", |m| {
        m["health"] == "warning" && m["reason"].as_str().unwrap_or("").contains("over the RPO")
    });
    let st = wait_for(&src, "critical for the RPO", |m| {
        m["health"] == "critical" && m["reason"].as_str().unwrap_or("").contains("twice the RPO")
    });
    let reason = st["machines"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reason.contains("of 2 s"), "{reason}");
    let m = metric_samples(&http_get(&metrics, "/metrics").1);
    assert_eq!(
        m.get("replog_machine_rpo_seconds{machine=\"vm1\"}"),
        Some(&2.0)
    );
    assert_eq!(m.get("replog_machine_health{machine=\"vm1\"}"), Some(&2.0));
    writer.join().expect("writer");
    // The target comes back: the lag falls, the health with it.
    let _target = TargetServe::start(&dst, &addr);
    wait_for(&src, "healthy again", |m| m["health"] == "healthy");
    assert!(served.stop().success());
}
