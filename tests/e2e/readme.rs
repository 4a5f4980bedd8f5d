//! The README's "Try it" block, run as pasted (with this run's ports, directory and binary in
//! place of the defaults) by bash against a live `portcullis demo`, so the README cannot drift
//! from what works.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// Kills the demo at the end of the test, whatever happens.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_try_it_block_works_as_pasted_against_a_live_demo() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let from = readme.find("From a second terminal").expect("the README's Try it block");
    let block = readme[from..]
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block.to_owned())
        .expect("a sh block after 'From a second terminal'");

    let bin = env!("CARGO_BIN_EXE_portcullis");
    let dir = tempfile::tempdir().expect("dir");
    // Every port 0: the demo binds them and its banner names the ones it got.
    let mut child = Command::new(bin)
        .args(["demo", "--no-npm", "--shell", "/bin/sh"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the demo");
    let stdout = child.stdout.take().expect("stdout");
    let demo = Demo(child);
    let banner = tokio::time::timeout(
        SOON,
        tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            let mut reader = std::io::BufReader::new(stdout).lines();
            for line in reader.by_ref().map_while(Result::ok) {
                let done = line.trim().starts_with("TOKEN=");
                lines.push(line);
                if done {
                    break;
                }
            }
            // Keep reading what the demo writes after, as a terminal would.
            std::thread::spawn(move || reader.for_each(drop));
            lines
        }),
    )
    .await
    .expect("the banner in time")
    .expect("banner reader");
    let token = banner.iter().find_map(|l| l.trim().strip_prefix("TOKEN=")).expect("a TOKEN= line").to_owned();
    let port_after = |prefix: &str| {
        banner
            .iter()
            .find_map(|l| l.split(prefix).nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no {prefix}PORT in the banner: {banner:?}"))
    };
    let (listen, admin) = (port_after("https://localhost:"), port_after("http://127.0.0.1:"));

    let script = block
        .replace("localhost:8443", &format!("localhost:{listen}"))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin}"))
        .replace("target/portcullis-demo", &dir.path().display().to_string())
        .replace("cargo run --release --", bin);
    let run = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg("-c")
            .arg(format!("TOKEN={token}\n{script}"))
            .stdin(Stdio::null())
            .output()
            .expect("bash")
    });
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the block ends").expect("join");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let all = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(out.status.success(), "{all}");
    assert!(!stderr.contains("curl: ("), "a curl step failed: {all}");
    assert!(stdout.contains("\"id\":1"), "the task was not started: {all}");
    assert!(stdout.contains("data:"), "the task's SSE output did not arrive: {all}");
    assert!(stdout.lines().any(|l| l.starts_with("HTTP/") && l.contains(" 403")), "no 403 for agent other: {all}");
    assert!(stderr.matches("connected (101").count() >= 2, "the two WebSocket steps did not connect: {all}");
    assert!(stdout.contains("portcullis_") && stdout.contains("\"sessions\""), "admin steps: {all}");
    assert!(stdout.trim_end().lines().last().is_some_and(|l| l.contains("eyJ")), "no minted token: {all}");
    drop(demo);
}

/// The anchor GitHub gives a Markdown heading: lower case, spaces to `-`, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every relative link of the README, the documentation index (and the pages it leads to
/// first), the benchmark page and the load tester's README points at a file that exists and,
/// with `#anchor`, at a heading of it: the guides a user follows cannot lead nowhere.
#[test]
fn the_readme_and_the_docs_index_link_only_to_what_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for page in
        ["README.md", "docs/README.md", "docs/replicas.md", "deploy/README.md", "BENCHMARKS.md", "loadtest/README.md"]
    {
        let path = root.join(page);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let link = &rest[..end];
            if link.starts_with("http") || link.starts_with("mailto:") || link.contains(' ') {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
            let target = if file.is_empty() { path.clone() } else { path.parent().expect("dir").join(file) };
            if !target.exists() {
                broken.push(format!("{page}: {link}: no such file"));
                continue;
            }
            if !anchor.is_empty() && target.extension().is_some_and(|e| e == "md") {
                let doc = std::fs::read_to_string(&target).expect("read");
                let found = doc
                    .lines()
                    .filter_map(|l| l.strip_prefix('#'))
                    .map(|h| slug(h.trim_start_matches('#')))
                    .any(|s| s == anchor);
                if !found {
                    broken.push(format!("{page}: {link}: no heading #{anchor}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
