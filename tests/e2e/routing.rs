//! Routing: registry resolver (coalescing, caching, 404, stale-if-error), sticky sessions that
//! agree across proxy instances, and passive ejection of failing members.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// A registry that answers `GET /agents/{agent}` from a table, counting requests.
struct Registry {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// agent → members JSON; a missing agent is 404; `down` answers 500 to everything.
    table: Arc<Mutex<(std::collections::HashMap<String, String>, bool)>>,
}

async fn registry() -> Registry {
    let table = Arc::new(Mutex::new((std::collections::HashMap::<String, String>::new(), false)));
    let t = table.clone();
    let respond = move |path: &str| {
        let agent = path.rsplit('/').next().unwrap_or("");
        let t = t.lock().expect("lock");
        match (t.1, t.0.get(agent)) {
            (true, _) => (500, String::new()),
            (false, Some(b)) => (200, b.clone()),
            (false, None) => (404, String::new()),
        }
    };
    // A little latency, so concurrent misses overlap.
    let (addr, hits) = http_server(respond, Duration::from_millis(50)).await;
    Registry { addr, hits, table }
}

/// The base route, with members from the registry at `reg` instead of static ones.
fn registry_config(reg: SocketAddr) -> TestConfig {
    TestConfig::base(&[]).one_address_load().remove("routes.0.backends").merge(
        "routes.0.registry",
        json!({
            "url": format!("http://{reg}/agents/{{agent}}"),
            // Long enough that 100 concurrent upgrades on a loaded machine finish inside them.
            "ttl": "3s",
            "negative_ttl": "2s",
            "stale_ttl": "10s",
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lookups_are_coalesced_cached_and_negatively_cached() {
    let backend = Backend::echo().await;
    let reg = registry().await;
    reg.table
        .lock()
        .expect("lock")
        .0
        .insert("a9".into(), format!("{{\"members\":[{{\"addr\":\"{}\"}}]}}", backend.addr));
    let proxy = Proxy::start_with(&registry_config(reg.addr).text()).await;

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let addr = proxy.plain;
            tokio::spawn(async move {
                upgrade(addr, false, "/agents/a9/terminal", &[]).await.map(|_| ()).map_err(|h| h.status)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), Ok(()));
    }
    assert_eq!(reg.hits.load(Ordering::SeqCst), 1, "100 concurrent connects, one registry request");
    upgrade(proxy.plain, false, "/agents/a9/terminal", &[]).await.expect("cached");
    assert_eq!(reg.hits.load(Ordering::SeqCst), 1, "cached within the TTL");

    // Unknown agent: 404, cached negatively.
    let err = upgrade(proxy.plain, false, "/agents/ghost/terminal", &[]).await.err().expect("404");
    assert_eq!(err.status, 404);
    let _ = upgrade(proxy.plain, false, "/agents/ghost/terminal", &[]).await;
    assert_eq!(reg.hits.load(Ordering::SeqCst), 2, "the 404 is cached");

    // Invalid ids never reach the registry.
    let err = upgrade(proxy.plain, false, "/agents/..%2f/terminal", &[]).await.err().expect("400");
    assert_eq!(err.status, 400);
    assert_eq!(reg.hits.load(Ordering::SeqCst), 2);

    // Registry down after the TTL: the last good members are still used (stale-if-error)...
    reg.table.lock().expect("lock").1 = true;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a9/terminal", &[]).await.expect("stale members used");
    c.send(true, op::TEXT, b"still routed").await;
    assert_eq!(c.recv().await.payload, b"still routed");
    // ...but an agent never seen before gets 503.
    let err = upgrade(proxy.plain, false, "/agents/newcomer/terminal", &[]).await.err().expect("503");
    assert_eq!(err.status, 503);
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&body, "portcullis_route_cache_total{result=\"stale\"}") >= 1.0, "{body}");
}

/// A backend that announces which member it is in its first frame, then echoes.
async fn named_backend(name: &'static str) -> Backend {
    let handler: Handler = Arc::new(move |mut s: BackendSession| {
        Box::pin(async move {
            let _ = s.stream.write_all(&encode(true, 0, op::TEXT, None, name.as_bytes())).await;
            echo_handler()(s).await;
        })
    });
    Backend::start(BackendOpts::default(), handler).await
}

async fn member_for(addr: SocketAddr, key: &str) -> String {
    let mut c = upgrade(addr, false, "/agents/a1/terminal", &[("X-Session", key)]).await.expect("101");
    String::from_utf8(c.recv().await.payload).expect("name")
}

fn sticky_config(members: &[&Backend]) -> String {
    let list: Vec<String> = members.iter().map(|b| b.addr.to_string()).collect();
    TestConfig::base(&list)
        .one_address_load()
        .merge("routes.0.balance", json!({"policy": "sticky", "sticky_key": "header:x-session"}))
        .text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_agree_across_instances_and_removing_a_member_moves_only_its_keys() {
    let names = ["m0", "m1", "m2", "m3", "m4"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(named_backend(n).await);
    }
    let all: Vec<&Backend> = backends.iter().collect();
    let a = ProxyProcess::start(&sticky_config(&all)).await;
    let b = ProxyProcess::start(&sticky_config(&all)).await;
    let without_m3: Vec<&Backend> = backends.iter().filter(|x| !std::ptr::eq(*x, &backends[3])).collect();
    let c = ProxyProcess::start(&sticky_config(&without_m3)).await;

    let keys: Vec<String> = (0..1000).map(|i| format!("session-{i}")).collect();
    let mut moved = 0;
    let mut on_m3 = 0;
    let mut spread = std::collections::HashMap::new();
    for chunk in keys.chunks(50) {
        let jobs: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|k| {
                let (pa, pb, pc) = (a.plain, b.plain, c.plain);
                tokio::spawn(
                    async move { (member_for(pa, &k).await, member_for(pb, &k).await, member_for(pc, &k).await) },
                )
            })
            .collect();
        for j in jobs {
            let (ma, mb, mc) = j.await.expect("job");
            assert_eq!(ma, mb, "two instances agree on every key");
            *spread.entry(ma.clone()).or_insert(0) += 1;
            if ma == "m3" {
                on_m3 += 1;
                assert_ne!(mc, "m3");
            } else if ma != mc {
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 0, "only keys on the removed member moved");
    assert!(on_m3 > 100, "m3 had its share of keys: {on_m3}");
    assert_eq!(spread.len(), 5, "every member got keys: {spread:?}");
}

#[tokio::test]
async fn member_failing_every_handshake_is_ejected_once_two_requesters_failed_on_it() {
    // A member that accepts TCP and hangs up at once: a failed backend handshake. One
    // requester's failures (a token's subject, whichever agents it names) may be its own
    // requests' doing and eject nothing; a second requester's failure shows the member is what
    // fails (found by a verification attack: with
    // no ejection at all, every session paid the broken member's failure, or its whole
    // handshake timeout for one that never answers). No client sees an error either way.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bad = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let good = Backend::echo().await;
    let key = hmac();
    let text = TestConfig::base(&[bad.to_string(), good.addr.to_string()])
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .merge("routes.0.health", json!({"eject_base": "30s"}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let started = Instant::now();
    let as_subject = |sub: &str| format!("Bearer {}", key.token_with(json!({"sub": sub, "agents": ["a1", "a2"]})));
    for (i, (sub, agent)) in [
        ("alice", "a1"),
        ("alice", "a2"),
        ("alice", "a1"),
        ("bob", "a1"),
        ("carol", "a1"),
        ("dave", "a2"),
        ("erin", "a1"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c =
            upgrade(proxy.plain, false, &format!("/agents/{agent}/terminal"), &[("Authorization", &as_subject(sub))])
                .await
                .unwrap_or_else(|h| panic!("session {i}: {}", h.status));
        c.send(true, op::TEXT, b"ok").await;
        assert_eq!(c.recv().await.payload, b"ok");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "tried by alice's three sessions (two agents) and bob's, then ejected"
    );
    assert_eq!(good.log.requests.lock().expect("lock").len(), 7, "every session reached the good member");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Found by an attacker review: members shared by every agent (a gateway that serves each
/// agent at its own path) were ejected by the handshakes of one user whose own agent the
/// gateway could not serve (503), so every other user's sessions got 503 until the backoff
/// ran out, and each new failure of the attacker's made it longer. A member's answer to a
/// request is not a member failure; only a failed connect is.
#[tokio::test]
async fn one_users_failing_agent_cannot_take_shared_members_away_from_everyone() {
    let gateway = || {
        Backend::start(BackendOpts { status_for: Some(("mallory-agent", 503)), ..Default::default() }, echo_handler())
    };
    let (g1, g2) = (gateway().await, gateway().await);
    let proxy = Proxy::start_with(&TestConfig::base(&[g1.addr.to_string(), g2.addr.to_string()]).text()).await;
    // Her own agents, one after the other: what the request names is not who asks.
    for agent in ["mallory-agent", "mallory-agent2", "mallory-agent3"].repeat(2) {
        let path = format!("/agents/{agent}/terminal");
        let refused = upgrade(proxy.plain, false, &path, &[]).await.err().expect("refused");
        assert_eq!(refused.status, 502, "the gateway's refusal of mallory's agent");
    }
    let (_, body) = http_get(proxy.admin, "/routes").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["routes"][0]["ejected"], serde_json::json!([]), "{body}");
    for _ in 0..4 {
        let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("alice's agent is served");
        c.send(true, op::TEXT, b"ok").await;
        assert_eq!(c.recv().await.payload, b"ok");
    }
}

/// Mallory's two accounts each open `agent`'s terminal once: the status each is refused with.
async fn two_accounts_try(proxy: &Proxy, key: &Hmac, agent: &str) -> Vec<u16> {
    let mut statuses = Vec::new();
    for account in ["mallory", "mallory-too"] {
        let token = format!("Bearer {}", key.token(account, &[agent], Duration::from_secs(600)));
        let path = format!("/agents/{agent}/terminal");
        let refused = upgrade(proxy.plain, false, &path, &[("authorization", &token)]).await.err().expect("refused");
        statuses.push(refused.status);
    }
    statuses
}

/// The first route's ejected members, as the admin API lists them.
async fn ejected(proxy: &Proxy) -> serde_json::Value {
    let (_, body) = http_get(proxy.admin, "/routes").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["routes"][0]["ejected"].clone()
}

/// A session on `agent`'s terminal with `bearer` opens and echoes (`why` says whose).
async fn served(proxy: &Proxy, agent: &str, bearer: &str, why: &str) {
    let path = format!("/agents/{agent}/terminal");
    let mut c = upgrade(proxy.plain, false, &path, &[("authorization", bearer)]).await.expect(why);
    c.send(true, op::TEXT, b"ok").await;
    assert_eq!(c.recv().await.payload, b"ok");
}

#[tokio::test]
async fn two_accounts_failing_together_cannot_take_away_members_that_serve_others() {
    // Mallory holds two accounts, and her own agent, which the shared gateway members cannot
    // serve (503). Each of her handshakes fails on both members, for two different requesters:
    // a member is ejected only when its recent handshakes failed at least as often as they
    // completed, and alice's complete.
    let gateway = || {
        Backend::start(BackendOpts { status_for: Some(("mallory-agent", 503)), ..Default::default() }, echo_handler())
    };
    let (g1, g2) = (gateway().await, gateway().await);
    let key = hmac();
    let text = TestConfig::base(&[g1.addr.to_string(), g2.addr.to_string()])
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}, "balance": {"policy": "round_robin"}}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let alice = key.bearer(&["a1"]);
    for _ in 0..6 {
        served(&proxy, "a1", &alice, "alice").await;
    }
    assert_eq!(two_accounts_try(&proxy, &key, "mallory-agent").await, [502, 502], "the gateways' refusals");
    assert_eq!(ejected(&proxy).await, json!([]));
    for _ in 0..4 {
        served(&proxy, "a1", &alice, "alice's agent is still served").await;
    }
}

/// One route to `member` alone, its grants in the tokens of `key`, an ejection lasting 30 s.
fn only_member(member: &str, key: &Hmac) -> TestConfig {
    TestConfig::base(&[member.to_owned()])
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}, "health": {"eject_base": "30s"}}))
}

/// Left open by the last reviews: a member used less often than every 10 s could be ejected by
/// two accounts failing between its users' sessions, and a newcomer (a requester it never
/// served) was then refused it (503) for the ejection's length. A member ejected for failed
/// handshakes it answered is the last resort, tried when no member is usable.
#[tokio::test]
async fn two_accounts_cannot_keep_a_newcomer_from_the_only_member() {
    let gateway =
        Backend::start(BackendOpts { status_for: Some(("mallory-agent", 503)), ..Default::default() }, echo_handler())
            .await;
    let key = hmac();
    let proxy = Proxy::start_with(&only_member(&gateway.addr.to_string(), &key).text()).await;
    assert_eq!(two_accounts_try(&proxy, &key, "mallory-agent").await, [502, 502], "the gateway's refusals");
    assert_eq!(ejected(&proxy).await, json!([gateway.addr.to_string()]));
    let bob = key.bearer(&["b1"]);
    served(&proxy, "b1", &bob, "bob, whom the member never served, still reaches it").await;
}

/// The cost of the first cut of the last resort (reverted): a member that takes connections
/// and never answers a handshake held every newcomer sent to it for the whole
/// `handshake_timeout` (504), a sink for the route's capacity. Ejected for handshakes that timed
/// out, a member takes one newcomer per `handshake_timeout`: the next gets 503 at once, and the
/// member is not asked.
#[tokio::test]
async fn a_member_that_lets_handshakes_time_out_takes_one_newcomer_at_a_time() {
    let member = Backend::start(BackendOpts { hang: true, ..Default::default() }, echo_handler()).await;
    let key = hmac();
    let proxy = Proxy::start_with(
        &only_member(&member.addr.to_string(), &key).set("backend.handshake_timeout", "300ms").text(),
    )
    .await;
    assert_eq!(two_accounts_try(&proxy, &key, "m1").await, [504, 504], "the member let the handshakes time out");
    assert_eq!(ejected(&proxy).await, json!([member.addr.to_string()]));
    let asked = member.log.requests.lock().expect("lock").len();
    // The accounts that ejected it do not get its probe, however often they ask.
    assert_eq!(two_accounts_try(&proxy, &key, "m1").await, [503, 503], "refused at once");
    assert_eq!(member.log.requests.lock().expect("lock").len(), asked, "the member was not asked");
    let (bob, carol) = (key.bearer(&["b1"]), key.bearer(&["c1"]));
    let (bob, carol) = ([("authorization", bob.as_str())], [("authorization", carol.as_str())]);
    // Carol asks once bob's attempt is at the member.
    let at_member = member.log.notify.notified();
    tokio::pin!(at_member);
    at_member.as_mut().enable();
    let (first, second) = tokio::join!(upgrade(proxy.plain, false, "/agents/b1/terminal", &bob), async {
        at_member.await;
        upgrade(proxy.plain, false, "/agents/c1/terminal", &carol).await
    });
    assert_eq!(first.err().expect("refused").status, 504, "the first newcomer tried it");
    assert_eq!(second.err().expect("refused").status, 503, "the next is refused at once, not held");
    assert_eq!(member.log.requests.lock().expect("lock").len(), asked + 1, "the member was asked once");
}

/// Found by the review of the last resort: whether a handshake times out can be an account's
/// doing (its own agent, behind a gateway the others share, never answers), so ejecting a
/// member for timeouts must not keep a newcomer from it either. The newcomer is let through
/// (one at a time), it is served, and the member is back for everyone.
#[tokio::test]
async fn two_accounts_whose_agent_never_answers_cannot_keep_a_newcomer_from_the_only_member() {
    let gateway =
        Backend::start(BackendOpts { hang_for: Some("mallory-agent"), ..Default::default() }, echo_handler()).await;
    let key = hmac();
    let proxy = Proxy::start_with(
        &only_member(&gateway.addr.to_string(), &key).set("backend.handshake_timeout", "300ms").text(),
    )
    .await;
    assert_eq!(two_accounts_try(&proxy, &key, "mallory-agent").await, [504, 504], "her agent never answers");
    assert_eq!(ejected(&proxy).await, json!([gateway.addr.to_string()]));
    served(&proxy, "b1", &key.bearer(&["b1"]), "bob, whom the member never served, still reaches it").await;
    assert_eq!(ejected(&proxy).await, json!([]), "served, the member is back");
    served(&proxy, "c1", &key.bearer(&["c1"]), "and carol after him").await;
}

#[tokio::test]
async fn purging_an_agent_forces_a_fresh_registry_lookup() {
    let backend = Backend::echo().await;
    let reg = registry().await;
    reg.table
        .lock()
        .expect("lock")
        .0
        .insert("a7".into(), format!("{{\"members\":[{{\"addr\":\"{}\"}}]}}", backend.addr));
    let proxy = Proxy::start_with(&registry_config(reg.addr).set("routes.0.registry.ttl", "1h").text()).await;
    upgrade(proxy.plain, false, "/agents/a7/terminal", &[]).await.expect("101");
    upgrade(proxy.plain, false, "/agents/a7/terminal", &[]).await.expect("101");
    assert_eq!(reg.hits.load(Ordering::SeqCst), 1);
    let (status, body) =
        admin_post(proxy.admin, "/routes/cache/purge", "{\"route\":\"terminal\",\"agent\":\"a7\"}").await;
    assert_eq!((status, body.as_str()), (200, "{\"purged_routes\":1}"));
    upgrade(proxy.plain, false, "/agents/a7/terminal", &[]).await.expect("101");
    assert_eq!(reg.hits.load(Ordering::SeqCst), 2, "purged entry fetched again");
    let (status, body) = http_get(proxy.admin, "/routes").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["routes"][0]["registry"], format!("http://{}/agents/{{agent}}", reg.addr));
    assert!(v["routes"][0]["cache"]["entries"].as_u64().is_some(), "{body}");
}

#[tokio::test]
async fn active_checks_eject_a_dead_member_before_any_client_hits_it() {
    let refusing = Refusing::new();
    let dead = refusing.addr.to_string();
    let good = Backend::echo().await;
    let text = TestConfig::base(&[dead.clone(), good.addr.to_string()])
        .merge("routes.0.health", json!({"active_interval": "100ms", "eject_base": "5s"}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    eventually("the dead member is ejected", async || {
        let (_, body) = http_get(proxy.admin, "/routes").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        (v["routes"][0]["ejected"] == serde_json::json!([dead])).then_some(())
    })
    .await;
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&body, "portcullis_member_healthy{route=\"terminal\"}"), 1.0);
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101 from the live member");
    c.send(true, op::TEXT, b"ok").await;
    assert_eq!(c.recv().await.payload, b"ok");
}

#[tokio::test]
async fn reload_keeps_the_registry_cache_of_an_unchanged_route() {
    let backend = Backend::echo().await;
    let reg = registry().await;
    reg.table
        .lock()
        .expect("lock")
        .0
        .insert("a5".into(), format!("{{\"members\":[{{\"addr\":\"{}\"}}]}}", backend.addr));
    let config = registry_config(reg.addr).set("routes.0.registry.ttl", "1h");
    let proxy = Proxy::start_with(&config.text()).await;
    upgrade(proxy.plain, false, "/agents/a5/terminal", &[]).await.expect("101");
    let changed = config.set("session.close_timeout", "2s").text();
    proxy
        .handle
        .reload(portcullis::config::Config::parse(&changed, std::path::Path::new("r.toml")).expect("config"))
        .expect("reload");
    upgrade(proxy.plain, false, "/agents/a5/terminal", &[]).await.expect("101");
    assert_eq!(reg.hits.load(Ordering::SeqCst), 1, "the cache survived the reload");
}

#[tokio::test]
async fn weight_zero_member_is_never_chosen() {
    let drained = named_backend("drained").await;
    let live = named_backend("live").await;
    let members =
        json!({"backends": [{"addr": drained.addr.to_string(), "weight": 0}, {"addr": live.addr.to_string()}]});
    let text = TestConfig::base(&[])
        .merge("routes.0", members)
        .merge("routes.0.balance", json!({"policy": "round_robin"}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    for _ in 0..6 {
        let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
        assert_eq!(c.recv().await.payload, b"live");
    }
}

#[tokio::test]
async fn member_refusing_connections_is_ejected_after_its_first_failure() {
    let refusing = Refusing::new();
    let refused = refusing.addr.to_string();
    let good = Backend::echo().await;
    let proxy = Proxy::start_with(&TestConfig::base(&[refused.clone(), good.addr.to_string()]).text()).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("the client sees no error");
    c.send(true, op::TEXT, b"ok").await;
    assert_eq!(c.recv().await.payload, b"ok");
    let (_, body) = http_get(proxy.admin, "/routes").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["routes"][0]["ejected"], serde_json::json!([refused]), "{body}");
    assert_eq!(good.log.requests.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn a_backend_refusing_a_request_with_4xx_is_not_ejected() {
    // Both members are up and answer 404 (say, an agent they do not host): a client's requests
    // must not change the proxy's view of their health.
    let a = Backend::start(BackendOpts { status: Some(404), ..Default::default() }, echo_handler()).await;
    let b = Backend::start(BackendOpts { status: Some(404), ..Default::default() }, echo_handler()).await;
    let proxy = Proxy::start_with(&TestConfig::base(&[a.addr.to_string(), b.addr.to_string()]).text()).await;
    for _ in 0..4 {
        let refused = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.err().expect("refused");
        assert_eq!(refused.status, 502, "the backend's refusal, not no_healthy_member");
    }
    let (status, body) = http_get(proxy.admin, "/routes").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let route = v["routes"].as_array().expect("routes").iter().find(|r| r["name"] == "terminal").expect("route");
    assert_eq!(route["ejected"], serde_json::json!([]), "{body}");
}

#[tokio::test]
async fn a_pool_whose_members_all_have_weight_zero_answers_503() {
    let a = Backend::echo().await;
    let b = Backend::echo().await;
    let members =
        json!({"backends": [{"addr": a.addr.to_string(), "weight": 0}, {"addr": b.addr.to_string(), "weight": 0}]});
    for fail_open in [false, true] {
        let text = TestConfig::base(&[])
            .merge("routes.0", members.clone())
            .merge("routes.0.health", json!({"fail_open": fail_open}))
            .text();
        let proxy = Proxy::start_with(&text).await;
        let refused = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.err().expect("refused");
        assert_eq!(refused.status, 503, "fail_open = {fail_open}: every member drained is no healthy member");
    }
}

#[tokio::test]
async fn a_reload_that_changes_backend_timeouts_reaches_the_active_health_checks() {
    // A member that answers the handshake after 400 ms: healthy under a 2 s handshake timeout,
    // failing its active checks under a 100 ms one.
    let slow =
        Backend::start(BackendOpts { delay: Some(Duration::from_millis(400)), ..Default::default() }, echo_handler())
            .await;
    let config = TestConfig::base(&[slow.addr.to_string()])
        .set("backend.handshake_timeout", "2s")
        .merge("routes.0.health", json!({"active_interval": "100ms", "active_path": "/health", "eject_base": "10s"}));
    let proxy = Proxy::start_with(&config.text()).await;
    let ejected = |body: &str| -> usize {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["routes"][0]["ejected"].as_array().map_or(0, |a| a.len())
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(ejected(&http_get(proxy.admin, "/routes").await.1), 0, "healthy under the 2 s timeout");
    let shorter = config.set("backend.handshake_timeout", "100ms").text();
    proxy
        .handle
        .reload(portcullis::config::Config::parse(&shorter, std::path::Path::new("r.toml")).expect("config"))
        .expect("reload");
    eventually("the active checks use the new handshake timeout", async || {
        (ejected(&http_get(proxy.admin, "/routes").await.1) != 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_catch_all_capture_carries_the_rest_of_the_path_to_the_backend() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("routes.0.path", "/agents/{agent}/ws/{*rest}")
        .set("routes.0.backend_path", "/shell/{agent}/{rest}")
        .text();
    let proxy = Proxy::start_with(&text).await;
    upgrade(proxy.plain, false, "/agents/a1/ws/pty/0?cols=80", &[]).await.expect("101");
    let req = backend.log.requests.lock().expect("lock")[0].clone();
    assert_eq!(req.path, "/shell/a1/pty/0?cols=80");
    for bad in ["/agents/a1/ws/pty/../../etc", "/agents/a1/ws/a//b", "/agents/a1/ws/%2e%2e/x"] {
        let refused = upgrade(proxy.plain, false, bad, &[]).await.err().expect("refused");
        assert_eq!(refused.status, 400, "{bad}");
    }
}

/// An active check connects from the addresses its route's connections leave from: a
/// WebSocket route's source addresses (a member behind a firewall that lets only those through
/// would otherwise fail every check and be ejected; the checks came from the kernel's choice of
/// address before), and for a plain HTTP route, whose requests do not use them, the kernel's
/// choice.
#[tokio::test]
async fn active_health_checks_connect_from_the_addresses_their_routes_connections_use() {
    for (kind, expected) in [("websocket", "127.0.0.2"), ("http", "127.0.0.1")] {
        let member = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a member");
        let text = TestConfig::base(&[member.local_addr().expect("its address").to_string()])
            .merge("backend", json!({"source_addresses": ["127.0.0.2"]}))
            .merge("routes.0", json!({"kind": kind}))
            .merge("routes.0.health", json!({"active_interval": "50ms"}))
            .text();
        let _proxy = Proxy::start_with(&text).await;
        for _ in 0..3 {
            let (_check, from) = tokio::time::timeout(Duration::from_secs(10), member.accept())
                .await
                .expect("a check within 10 s")
                .expect("accepted");
            assert_eq!(from.ip().to_string(), expected, "a {kind} route's check");
        }
    }
}

#[tokio::test]
async fn backend_connections_are_made_from_the_configured_source_addresses_in_turn() {
    let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = peers.clone();
    let handler: Handler = Arc::new(move |s: BackendSession| {
        if let Ok(peer) = s.stream.peer_addr() {
            seen.lock().expect("lock").push(peer.ip().to_string());
        }
        (echo_handler())(s)
    });
    let backend = Backend::start(BackendOpts::default(), handler).await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("backend", json!({"source_addresses": ["127.0.0.2", "127.0.0.3", "::1"]}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    for i in 0..4 {
        let mut c = upgrade(proxy.plain, false, &format!("/agents/a{i}/terminal"), &[]).await.expect("101");
        c.send(true, op::TEXT, b"hi").await;
        assert_eq!(c.recv().await.payload, b"hi");
    }
    let mut peers = peers.lock().expect("lock").clone();
    peers.sort();
    // An IPv4 member is dialled from the IPv4 ones only, each in turn.
    assert_eq!(peers, ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]);
}
