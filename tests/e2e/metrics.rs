//! `/metrics` shows the core counters moving.

use crate::harness::*;

#[tokio::test]
async fn metrics_move_with_a_session() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let (status, before) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(status, 200);
    let series = [
        "portcullis_connections_total",
        "portcullis_upgrades_total{route=\"terminal\",result=\"ok\"}",
        "portcullis_frames_total{direction=\"client_to_backend\"}",
        "portcullis_frames_total{direction=\"backend_to_client\"}",
        "portcullis_bytes_total{direction=\"client_to_backend\"}",
        "portcullis_bytes_total{direction=\"backend_to_client\"}",
        "portcullis_closes_total{code=\"1000\",initiator=\"client\"}",
        "portcullis_backend_connect_seconds_count",
    ];
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    for _ in 0..3 {
        c.send(true, op::TEXT, b"count me").await;
        c.recv().await;
    }
    c.send(true, op::CLOSE, &close_payload(1000, "")).await;
    c.recv().await;
    c.expect_eof().await;
    let _ = raw_request(proxy.tls, true, b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n").await;
    // The session's end is recorded right after its sockets close.
    eventually("every series moved", async || {
        let (_, after) = http_get(proxy.admin, "/metrics").await;
        let moved = series.iter().filter(|s| metric(&after, s) > metric(&before, s)).count();
        let no_route = metric(&after, "portcullis_upgrades_total{route=\"none\",result=\"no_route\"}");
        if !(moved == series.len() && no_route >= 1.0) {
            return None;
        }
        assert!(after.contains("portcullis_connections_active"));
        assert!(after.contains("portcullis_sessions_active"));
        Some(())
    })
    .await;
    let (live, _) = http_get(proxy.admin, "/live").await;
    let (ready, _) = http_get(proxy.admin, "/ready").await;
    assert_eq!((live, ready), (200, 200));
}

/// The names `docs/metrics.md` documents, with their kinds as the table writes them.
fn documented() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).expect("docs/metrics.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `portcullis_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once('`')?;
            let kind = rest.split('|').nth(1)?.trim().to_owned();
            Some((format!("portcullis_{name}"), kind))
        })
        .collect()
}

#[test]
fn the_docs_list_exactly_the_catalog_of_metrics_with_their_kinds() {
    use portcullis::metrics::{Kind, CATALOG};
    let mut docs = documented();
    docs.sort();
    let mut catalog: Vec<(String, String)> = CATALOG
        .iter()
        .map(|&(kind, name, _)| {
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                // Without buckets the exporter renders a histogram as a summary.
                Kind::Histogram if name == "portcullis_registry_seconds" => "summary",
                Kind::Histogram => "histogram",
            };
            (name.to_owned(), kind.to_owned())
        })
        .collect();
    catalog.sort();
    assert_eq!(docs, catalog);
}

#[tokio::test]
async fn every_exported_family_has_its_help_text() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    c.send(true, op::TEXT, b"x").await;
    c.recv().await;
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    let types: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("portcullis_"))
        .collect();
    assert!(types.len() >= 10, "{body}");
    for name in types {
        let help = body.lines().find_map(|l| l.strip_prefix(&format!("# HELP {name} ")));
        assert!(help.is_some_and(|h| !h.is_empty()), "{name} has no HELP:\n{body}");
    }
}

/// The `portcullis_*` metric names a file mentions, with the histogram series suffixes taken off.
fn names_in(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("portcullis_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(w)
                .to_owned()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_dashboard_and_the_alert_rules_name_only_metrics_portcullis_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/portcullis.json")).expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a panel for each area");
    let rules = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).expect("rules");
    for (file, text) in [("dashboard", &dashboard), ("alert rules", &rules)] {
        let names = names_in(text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                portcullis::metrics::CATALOG.iter().any(|&(_, n, _)| n == name),
                "{file} names {name}, which Portcullis does not export"
            );
        }
    }
    // The areas the issue asks the dashboard for are each there.
    for metric in [
        "portcullis_sessions_active",
        "portcullis_upgrades_total",
        "portcullis_closes_total",
        "portcullis_auth_failures_total",
        "portcullis_bytes_total",
        "portcullis_frames_total",
        "portcullis_backend_connect_seconds",
        "portcullis_member_healthy",
        "portcullis_reloads_total",
    ] {
        assert!(names_in(&dashboard).iter().any(|n| n == metric), "no panel shows {metric}");
    }
    // One unit per axis: a latency (a histogram quantile) is in seconds, a rate in a rate
    // unit, wherever they share a panel (a second unit goes on the right axis by override).
    for panel in panels.iter().filter(|p| p["type"] == "timeseries") {
        let title = panel["title"].as_str().unwrap_or("?");
        let default = panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let (reference, expr) = (target["refId"].as_str().unwrap_or(""), target["expr"].as_str().unwrap_or(""));
            let overridden = panel["fieldConfig"]["overrides"].as_array().into_iter().flatten().find_map(|o| {
                (o["matcher"]["options"] == reference).then(|| {
                    o["properties"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["id"] == "unit")
                        .map(|p| p["value"].clone())
                })?
            });
            let unit = overridden.as_ref().and_then(|u| u.as_str()).unwrap_or(default);
            if expr.contains("histogram_quantile") {
                assert_eq!(unit, "s", "{title}: {reference} is a latency, shown in {unit}");
            } else if expr.contains("rate(") {
                assert!(["ops", "reqps", "Bps"].contains(&unit), "{title}: {reference} is a rate, shown in {unit}");
            }
        }
    }
    // An overview row of stats first, and a per-pod row (each replica apart).
    let rows: Vec<&str> = panels.iter().filter(|p| p["type"] == "row").filter_map(|p| p["title"].as_str()).collect();
    assert_eq!(rows.first(), Some(&"Overview"), "{rows:?}");
    assert!(rows.contains(&"Per pod"), "{rows:?}");
    assert!(panels.iter().filter(|p| p["type"] == "stat").count() >= 4, "an overview of stats");
    assert!(dashboard.contains("sum by (instance)"), "a panel per pod");
}

#[tokio::test]
async fn the_series_alerts_count_exist_at_zero_from_start() {
    // A child process: nothing has happened in it yet.
    let backend = Backend::echo().await;
    let key = hmac();
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    for series in [
        r#"portcullis_upgrades_total{route="terminal",result="ok"} 0"#,
        r#"portcullis_auth_failures_total{route="terminal",reason="bad_signature"} 0"#,
        r#"portcullis_auth_failures_total{route="terminal",reason="expired"} 0"#,
        r#"portcullis_http2_streams_total{kind="websocket"} 0"#,
        r#"portcullis_reloads_total{result="error"} 0"#,
        r#"portcullis_reloads_total{result="ok"} 0"#,
        r#"portcullis_jwks_fetches_total{result="error"} 0"#,
        r#"portcullis_closes_total{code="1014",initiator="backend"} 0"#,
        r#"portcullis_closes_total{code="1001",initiator="proxy"} 0"#,
        "portcullis_pooled_pressure_closes_total 0",
    ] {
        assert!(body.lines().any(|l| l == series), "{series} missing:\n{body}");
    }
}
