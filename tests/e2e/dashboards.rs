//! Many dashboards: 20 agents each stream events to 50 watchers through the proxy (1,000
//! sessions), driven by the load-test harness's `watch` scenario against its `broadcast`
//! backend. Every event must reach every watcher, in order, and the report carries each
//! watcher's latency percentiles.

use std::time::Duration;

use portcullis_loadtest::backend::{self, BackendOptions, Mode};
use portcullis_loadtest::{run, Kind, Scenario};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_stream_every_event_in_order_to_fifty_watchers_each() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = listener.local_addr().expect("addr");
    let opts =
        BackendOptions { watchers: 50, events: 40, rate: 20.0, size: 128, ..BackendOptions::new(Mode::Broadcast) };
    tokio::spawn(backend::serve(listener, opts));
    let text = TestConfig::base(&[backend_addr.to_string()])
        .set("routes.0.path", "/agents/{agent}/events")
        .merge("server", json!({"max_connections": 5000}))
        .one_address_load()
        // One test process holds the clients, the proxy and the backend: 1,000 handshakes at
        // once take longer than the base config's 1 s.
        .merge("backend", json!({"connect_timeout": "10s", "handshake_timeout": "10s"}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let scenario = Scenario {
        scenario: Kind::Watch,
        target: Some(format!("ws://{}/agents/agent-{{conn / 50}}/events", proxy.plain)),
        connections: 1000,
        watchers: 50,
        events: 40,
        size: 128,
        duration: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(20),
        ramp: 500.0,
        quiet: true,
        ..Scenario::default()
    };
    let report = run(&scenario).await.expect("run");
    let w = report.watch.clone().expect("watch summary");
    assert_eq!(report.opened, 1000, "{}", report.table());
    assert_eq!((w.agents, w.watchers, w.complete), (20, 1000, 1000), "{}", report.table());
    assert!(report.is_clean(), "{}", report.table());
    assert_eq!(report.received, 40_000);
    assert_eq!(report.close_codes.get(&1000), Some(&1000), "{}", report.table());
    assert_eq!(w.per_watcher_p50_us.count, 1000, "every watcher has its own percentiles");
    assert!(w.per_watcher_p99_us.max >= w.per_watcher_p50_us.max.min(w.per_watcher_p99_us.max));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_http_and_sse_scenarios_run_clean_through_the_proxy() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = listener.local_addr().expect("addr");
    tokio::spawn(backend::serve(listener, BackendOptions::new(Mode::Echo)));
    let text = TestConfig::base(&[backend_addr.to_string()])
        .set("routes.0.path", "/agents/{agent}/api/{*rest}")
        .set("routes.0.kind", "http")
        .one_address_load()
        .text();
    let proxy = Proxy::start_with(&text).await;
    for (kind, path) in [(Kind::Http, "echo"), (Kind::Sse, "sse?rate=200")] {
        let scenario = Scenario {
            scenario: kind,
            target: Some(format!("http://{}/agents/agent-{{conn}}/api/{path}", proxy.plain)),
            connections: 4,
            size: 128,
            duration: Duration::from_secs(1),
            quiet: true,
            ..Scenario::default()
        };
        let report = run(&scenario).await.expect("run");
        assert!(report.is_clean() && report.errors.is_empty(), "{}", report.table());
        assert!(report.received > 100, "{}", report.table());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_fan_out_watchers_that_never_read_are_dropped_and_the_others_get_everything() {
    // The backend sees one connection per agent (the fan-out's), so its events start
    // `start_after` the first: by then every watcher has joined.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = listener.local_addr().expect("addr");
    let opts = BackendOptions {
        watchers: 5,
        events: 800,
        rate: 400.0,
        size: 16 * 1024,
        start_after: Duration::from_secs(3),
        ..BackendOptions::new(Mode::Broadcast)
    };
    tokio::spawn(backend::serve(listener, opts));
    let text = TestConfig::base(&[backend_addr.to_string()])
        .set("routes.0.name", "dashboards-stalled")
        .set("routes.0.path", "/agents/{agent}/events")
        .merge("routes.0", json!({"fanout": {"queue": 256, "drop_grace": "200ms"}}))
        .one_address_load()
        .text();
    let proxy = Proxy::start_with(&text).await;
    // 12.5 MiB per agent: more than a stalled watcher's socket buffers and queue (4 MiB) hold;
    // a reading watcher would have to fall 0.64 s behind to be dropped.
    let scenario = Scenario {
        scenario: Kind::Watch,
        target: Some(format!("ws://{}/agents/agent-{{conn / 5}}/events", proxy.plain)),
        connections: 10,
        watchers: 5,
        events: 800,
        size: 16 * 1024,
        stall: 2,
        duration: Duration::from_secs(30),
        quiet: true,
        ..Scenario::default()
    };
    let report = run(&scenario).await.expect("run");
    let w = report.watch.clone().expect("watch summary");
    assert_eq!((w.watchers, w.complete), (10, 10), "{}", report.table());
    assert!(report.is_clean() && report.errors.is_empty(), "{}", report.table());
    assert_eq!(w.stalled, 2, "{}", report.table());
    let dropped: u64 =
        w.stalled_ends.iter().filter(|(end, _)| *end == "cut" || *end == "closed 1013").map(|(_, n)| n).sum();
    assert_eq!(dropped, 2, "{:?}", w.stalled_ends);
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_fanout_drops_total{route=\"dashboards-stalled\",reason=\"slow\"}"), 2.0);
    assert_eq!(metric(&m, "portcullis_fanout_streams_total{route=\"dashboards-stalled\"}"), 2.0);
}
