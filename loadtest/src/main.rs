//! `portcullis-loadtest`: command line of the load-test harness.
//!
//! Exit codes: 0 success, 1 error, 2 integrity failure (lost, duplicated, reordered or corrupted
//! messages), 64 bad arguments or scenario file. A run where no session opens exits 1.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis_loadtest::backend::{self, BackendOptions};
use portcullis_loadtest::compare;
use portcullis_loadtest::sys::Pids;
use portcullis_loadtest::{run, Kind, Report, Scenario};

#[derive(Parser)]
#[command(name = "portcullis-loadtest", version, about = "WebSocket load tests with integrity checks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed loop: N sessions, a window of messages in flight each.
    Echo(ScenarioArgs),
    /// Open loop at a fixed total rate; latency from intended send times (coordinated omission corrected).
    Rate(ScenarioArgs),
    /// Open N sessions (at --ramp per second) and hold them for --duration.
    Idle(ScenarioArgs),
    /// Connect, exchange one message, close, as fast as --connections workers can.
    Storm(ScenarioArgs),
    /// Keystrokes at human rates (use a `--mode terminal` backend); keystroke-to-echo latency.
    Terminal(ScenarioArgs),
    /// Dashboards: watchers per agent receive every event (a `--mode broadcast` backend), in order.
    Watch(ScenarioArgs),
    /// Plain HTTP requests on kept-alive connections (http:// or https:// target); requests/s.
    Http(ScenarioArgs),
    /// Server-Sent Events streams (http:// or https:// target); events/s, in order.
    Sse(ScenarioArgs),
    /// The benchmark page's headline from `peers/compare.sh` results: a Markdown table and an
    /// SVG plot of Portcullis, NGINX, HAProxy and direct, and Portcullis against the best peer.
    Headline {
        /// A set of results: `NAME=DIR` (compare.sh's OUT directory), e.g. `plain=/tmp/p` `TLS=/tmp/t`.
        #[arg(required = true)]
        sets: Vec<String>,
        /// Write the SVG plot here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Merge the JSON reports of workers that ran shares of one scenario at once (`--shard K/N
    /// --json FILE` on each): counts summed, percentiles from the merged histograms (never
    /// averaged).
    Merge {
        /// The workers' reports (`--json` files).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        output: Output,
    },
    /// MCP over Streamable HTTP (http:// or https:// target): each connection initialises a
    /// session, then calls the `echo` tool in a closed loop (a `size`-byte call, its answer
    /// checked); calls/s.
    Mcp(ScenarioArgs),
    /// Run a TOML scenario file (see loadtest/scenarios/).
    Run {
        /// The scenario file.
        file: PathBuf,
        /// Override the file's target URL.
        #[arg(long)]
        target: Option<String>,
        /// Override the file's target pid(s), comma-separated (sampled and summed).
        #[arg(long, value_name = "PID[,PID...]")]
        pid: Option<Pids>,
        #[command(flatten)]
        output: Output,
    },
    /// Serve a WebSocket backend (the agent side).
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7681")]
        listen: String,
        #[command(flatten)]
        opts: BackendOptions,
    },
    /// Internal: a `--procs` worker process.
    #[command(hide = true)]
    Worker,
    /// Run one scenario against several targets (name=URL), interleaved and repeated; print ratios.
    Compare {
        /// Scenario kind (echo, rate, idle, storm, terminal, with the scenario flags below) or a TOML
        /// scenario file (then the scenario flags are ignored).
        #[arg(long)]
        scenario: String,
        /// Rounds over all targets; medians are reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Target process ids to sample, `name=PID`, or `name=PID,PID,...` to sum a target's
        /// processes (e.g. all NGINX workers); repeatable.
        #[arg(long = "pid-of", value_name = "NAME=PID[,PID...]", value_parser = compare::parse_pid_of)]
        pid_of: Vec<(String, Pids)>,
        /// The watch scenario's `--stall` for one target, `name=N` (e.g. the same URL twice,
        /// as `fanout` and `fanout-stalled`); repeatable.
        #[arg(long = "stall-of", value_name = "NAME=N", value_parser = compare::parse_stall_of)]
        stall_of: Vec<(String, u64)>,
        /// Pause between runs.
        #[arg(long, default_value = "1s", value_parser = portcullis_loadtest::parse_duration)]
        pause: Duration,
        /// Write the summaries and every run's report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Targets, `name=URL`; the first is the baseline.
        #[arg(required = true)]
        targets: Vec<String>,
        #[command(flatten)]
        scenario_args: Scenario,
    },
}

#[derive(clap::Args)]
struct ScenarioArgs {
    #[command(flatten)]
    scenario: Scenario,
    #[command(flatten)]
    output: Output,
}

#[derive(clap::Args)]
struct Output {
    /// Also write the report as JSON to this file (`-`: to standard output, without the table,
    /// so that a worker's log is its report).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write a self-contained HTML report (latency percentile plot, throughput over time).
    #[arg(long)]
    html: Option<PathBuf>,
    /// Fail the run (exit 3) when a metric is above a limit: `p99>50ms`, `p50>5ms`,
    /// `handshake_p99>200ms`, `refused>5%` (sessions asked for but not opened), `errors>0`.
    /// Repeatable.
    #[arg(long = "fail-on", value_name = "NAME>LIMIT")]
    fail_on: Vec<portcullis_loadtest::stats::Threshold>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<ExitCode> {
    let (mut scenario, output) = match cli.command {
        Command::Echo(a) => (with_kind(a.scenario, Kind::Echo), a.output),
        Command::Rate(a) => (with_kind(a.scenario, Kind::Rate), a.output),
        Command::Idle(a) => (with_kind(a.scenario, Kind::Idle), a.output),
        Command::Storm(a) => (with_kind(a.scenario, Kind::Storm), a.output),
        Command::Terminal(a) => (with_kind(a.scenario, Kind::Terminal), a.output),
        Command::Watch(a) => (with_kind(a.scenario, Kind::Watch), a.output),
        Command::Http(a) => (with_kind(a.scenario, Kind::Http), a.output),
        Command::Mcp(a) => (with_kind(a.scenario, Kind::Mcp), a.output),
        Command::Sse(a) => (with_kind(a.scenario, Kind::Sse), a.output),
        Command::Run { file, target, pid, output } => {
            let mut s = match Scenario::from_file(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Ok(ExitCode::from(64));
                }
            };
            s.target = target.or(s.target);
            s.pid = pid.or(s.pid);
            (s, output)
        }
        Command::Headline { sets, svg } => {
            let mut read = Vec::new();
            for set in &sets {
                let (name, dir) = set.split_once('=').context("a set is NAME=DIR")?;
                read.push(portcullis_loadtest::headline::read_set(name, std::path::Path::new(dir))?);
            }
            println!("{}", portcullis_loadtest::headline::markdown(&read));
            if let Some(path) = svg {
                std::fs::write(&path, portcullis_loadtest::headline::svg(&read))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Merge { files, output } => {
            let mut parts = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
                // A file may be a worker's log (`--json -`, warnings before it): the report starts
                // at its first line that opens a JSON object.
                let start = text.lines().position(|l| l == "{").unwrap_or(0);
                let json: String = text.lines().skip(start).collect::<Vec<_>>().join("\n");
                parts.push(
                    serde_json::from_str::<Report>(&json)
                        .with_context(|| format!("{} holds no report (--json)", f.display()))?,
                );
            }
            // Shares of one run only: the same scenario against the same target.
            for (f, p) in files.iter().zip(&parts).skip(1) {
                let (first, other) = (&parts[0], p);
                if (&first.scenario, &first.target) != (&other.scenario, &other.target) {
                    anyhow::bail!(
                        "{} ran {} against {}, but {} ran {} against {}: merge the shares of one run only",
                        files[0].display(),
                        first.scenario,
                        first.target,
                        f.display(),
                        other.scenario,
                        other.target
                    );
                }
            }
            let n = parts.len();
            let meta = parts.first().map(|p| p.meta.clone()).unwrap_or_default();
            let mut report = Report::merge(parts);
            report.meta = meta;
            report.notes.push(format!("merged from {n} worker reports"));
            write_report(&report, &output)?;
            return Ok(verdict(&report, &output));
        }
        Command::Worker => {
            portcullis_loadtest::procs::worker().await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Backend { listen, opts } => {
            // A backlog of 4,096 (tokio's bind gives 1,024): a ramp of thousands of sessions a
            // second on a busy machine overflows a short one, and a dropped SYN costs a second.
            let addr = tokio::net::lookup_host(&listen)
                .await
                .with_context(|| format!("cannot resolve {listen}"))?
                .next()
                .with_context(|| format!("{listen} resolves to no address"))?;
            let socket =
                if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
            socket.set_reuseaddr(true)?;
            socket.bind(addr).with_context(|| format!("cannot listen on {listen}"))?;
            let listener = socket.listen(4096).with_context(|| format!("cannot listen on {listen}"))?;
            let tls = match (&opts.tls_cert, &opts.tls_key) {
                (Some(cert), Some(key)) => Some(backend::tls_acceptor(cert, key)?),
                _ => None,
            };
            let scheme = if tls.is_some() { "wss" } else { "ws" };
            eprintln!("backend ({:?}) listening on {scheme}://{}", opts.mode, listener.local_addr()?);
            portcullis_loadtest::sys::raise_fd_limit();
            tokio::select! {
                _ = backend::serve_with(listener, opts, tls) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Compare { scenario, repeat, pid_of, stall_of, pause, json, targets, scenario_args } => {
            let base = if std::path::Path::new(&scenario).is_file() {
                Scenario::from_file(std::path::Path::new(&scenario))?
            } else {
                let kind = <Kind as clap::ValueEnum>::from_str(&scenario, true)
                    .map_err(|_| anyhow::anyhow!("--scenario is echo, rate, idle, storm, terminal or a file"))?;
                with_kind(scenario_args, kind)
            };
            let targets = compare::parse_targets(&targets)?;
            let pids: HashMap<String, Pids> = pid_of.into_iter().collect();
            let stalls: HashMap<String, u64> = stall_of.into_iter().collect();
            let rows = compare::compare(&base, &targets, repeat, &pids, &stalls, pause).await?;
            println!("{}", compare::table(base.scenario, &rows));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let clean = rows.iter().all(|r| r.runs.iter().all(Report::is_clean));
            return Ok(if clean { ExitCode::SUCCESS } else { ExitCode::from(2) });
        }
    };
    if scenario.target.is_none() {
        eprintln!("error: no target: pass --target ws://host:port/path");
        return Ok(ExitCode::from(64));
    }
    scenario.quiet |= !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let meta = portcullis_loadtest::stats::RunMeta::now();
    let mut report = run(&scenario).await?;
    report.meta = meta;
    write_report(&report, &output)?;
    Ok(verdict(&report, &output))
}

/// Prints the report's table and writes what `output` asks for.
fn write_report(report: &Report, output: &Output) -> anyhow::Result<()> {
    // `--json -`: the report alone on standard output (a pod's log is the report).
    let to_stdout = output.json.as_deref().is_some_and(|p| p == std::path::Path::new("-"));
    if !to_stdout {
        println!("{}", report.table());
    }
    if let Some(path) = &output.json {
        let text = serde_json::to_string_pretty(report)?;
        match to_stdout {
            true => println!("{text}"),
            false => std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?,
        }
    }
    if let Some(path) = &output.html {
        std::fs::write(path, portcullis_loadtest::html::render(report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The exit code a report earns: 2 for an integrity failure, 1 when no session opened, 3 for a
/// `--fail-on` threshold passed.
fn verdict(report: &Report, output: &Output) -> ExitCode {
    if report.opened < report.connections && report.scenario != "storm" {
        eprintln!(
            "warning: {} of {} sessions were not opened (see the errors above; --fail-on refused>N% makes this fail)",
            report.connections - report.opened,
            report.connections
        );
    }
    let breaches: Vec<String> = output.fail_on.iter().filter_map(|t| t.breach(report)).collect();
    for b in &breaches {
        eprintln!("{b}");
    }
    if !report.is_clean() {
        ExitCode::from(2)
    } else if report.opened == 0 && report.connections > 0 {
        eprintln!("error: no session could be opened (see the errors above)");
        ExitCode::FAILURE
    } else if !breaches.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn with_kind(mut s: Scenario, kind: Kind) -> Scenario {
    s.scenario = kind;
    s
}

#[cfg(test)]
mod tests {
    use clap::{error::ErrorKind, CommandFactory, Parser};

    use super::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("portcullis-loadtest").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn pid_flags_take_comma_separated_pids() {
        match parse(&["idle", "--pid", "123,456"]).unwrap().command {
            Command::Idle(a) => assert_eq!(a.scenario.pid.unwrap().as_slice(), [123, 456]),
            _ => unreachable!(),
        }
        match parse(&["echo", "--pid", "123"]).unwrap().command {
            Command::Echo(a) => assert_eq!(a.scenario.pid.unwrap().as_slice(), [123]),
            _ => unreachable!(),
        }
        match parse(&["run", "x.toml", "--pid", "7,8"]).unwrap().command {
            Command::Run { pid, .. } => assert_eq!(pid.unwrap().as_slice(), [7, 8]),
            _ => unreachable!(),
        }
        let cli = parse(&["compare", "--scenario", "echo", "--pid-of", "a=1", "--pid-of", "nginx=2,3", "a=ws://x"]);
        match cli.unwrap().command {
            Command::Compare { pid_of, .. } => {
                let got: Vec<(&str, &[u32])> = pid_of.iter().map(|(n, p)| (n.as_str(), p.as_slice())).collect();
                assert_eq!(got, [("a", &[1][..]), ("nginx", &[2, 3][..])]);
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn bad_pids_are_argument_errors() {
        for args in [
            &["echo", "--pid", "abc"][..],
            &["echo", "--pid", ""],
            &["echo", "--pid", "1,,2"],
            &["run", "x.toml", "--pid", "1,x"],
            &["compare", "--scenario", "echo", "--pid-of", "nginx=", "a=ws://x"],
            &["compare", "--scenario", "echo", "--pid-of", "nginx=1,a", "a=ws://x"],
            &["compare", "--scenario", "echo", "--pid-of", "nginx", "a=ws://x"],
        ] {
            let err = parse(args).err().unwrap_or_else(|| panic!("{args:?} parsed"));
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}: {err}");
        }
    }
}
