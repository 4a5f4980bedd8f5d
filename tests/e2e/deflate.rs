//! permessage-deflate negotiated end to end: a Python `websockets` client and server (both
//! support the extension; no Rust library in the tree does) exchange compressed messages
//! through the proxy, which passes RSV1 and the compressed payloads through untouched.
//! Needs `python3` with `websockets` (`.ci/run` installs it).

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::*;

const BACKEND: &str = r#"
import asyncio, sys, websockets
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", 0, compression="deflate") as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

const CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], compression="deflate") as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in ext, ext
        assert any(type(e).__name__ == "PerMessageDeflate" for e in ws.protocol.extensions), ws.protocol.extensions
        for i in range(50):
            msg = ("agent output line %d " % i) * 200
            await ws.send(msg)
            assert await ws.recv() == msg
        blob = bytes(range(256)) * 400
        await ws.send(blob)
        assert await ws.recv() == blob
    print("ok", flush=True)
asyncio.run(main())
"#;

#[tokio::test]
async fn permessage_deflate_negotiated_end_to_end_passes_through() {
    let mut server = Command::new("python3")
        .args(["-c", BACKEND])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 must be installed (with the websockets package)");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout")).read_line(&mut line).await.expect("port line");
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("python backend failed to start: {line:?} (pip install websockets)"));
    let proxy = Proxy::start(([127, 0, 0, 1], port).into(), "").await;
    let url = format!("ws://{}/agents/a1/terminal", proxy.plain);
    let out = Command::new("python3").args(["-c", CLIENT, &url]).output().await.expect("python client");
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&body, "portcullis_upgrades_total{route=\"terminal\",result=\"ok\"}") >= 1.0);
}
