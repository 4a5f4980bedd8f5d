//! Routing costs on the connect path: route matching, a registry cache hit, and the sticky
//! (rendezvous) choice over pools of 10, 100 and 1,000 members.
//!
//! `cargo bench --bench routing`

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use portcullis::config::Config;
use portcullis::routing::resolver::{RegistryResolver, RegistrySettings};
use portcullis::routing::sticky::{rank, Member};
use portcullis::routing::table::RouteTable;

fn bench(c: &mut Criterion) {
    let mut toml = String::from("[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n");
    for i in 0..50 {
        toml.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath = \"/svc{i}/{{agent}}/terminal\"\nbackends = [\"127.0.0.1:{}\"]\n",
            1000 + i
        ));
    }
    toml.push_str(
        "[[routes]]\nname = \"agents\"\npath = \"/agents/{agent}/terminal\"\nbackends = [\"127.0.0.1:7681\"]\n",
    );
    let config = Config::parse(&toml, Path::new("bench.toml")).expect("config");
    let table = RouteTable::new(&config.routes);
    c.bench_function("route_match_51_routes", |b| {
        b.iter(|| table.find(Some("agents.example.com"), "/agents/agent-42.prod/terminal").expect("match"))
    });

    // A registry cache hit: the registry is never contacted after the first (stale) miss, so
    // the entry is inserted by hand through a tiny local HTTP server.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let resolver = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let body = r#"{"members":[{"addr":"10.0.0.1:7681","weight":1}]}"#;
                let resp =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let r = RegistryResolver::new(RegistrySettings {
            url: format!("http://{addr}/agents/{{agent}}"),
            token: None,
            timeout: Duration::from_secs(2),
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            stale_ttl: Duration::from_secs(60),
            max_capacity: 10_000,
        });
        let url = format!("http://{addr}/agents/a1");
        r.resolve(&url).await.expect("first lookup");
        (r, url)
    });
    let (resolver, url): (Arc<RegistryResolver>, String) = resolver;
    c.bench_function("registry_cache_hit", |b| b.iter(|| rt.block_on(resolver.resolve(&url)).expect("hit")));

    let mut group = c.benchmark_group("rendezvous");
    for n in [10usize, 100, 1000] {
        let members: Vec<Member> =
            (0..n).map(|i| Member { addr: format!("10.0.{}.{}:7681", i / 250, i % 250), weight: 1 }).collect();
        group.bench_with_input(BenchmarkId::new("rank", n), &members, |b, m| b.iter(|| rank(b"session-1234", m)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
