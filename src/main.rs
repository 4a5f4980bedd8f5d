//! The `portcullis` command: run the proxy, check a config, run the demo, mint and try things.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis::config::{Config, WorkerModel};
use portcullis::server::{self, Bound};

mod client;
mod demo;
mod mint;

/// Exit code for an unusable configuration (EX_CONFIG is 78; linkerd and sysexits' EX_USAGE
/// family use 64 for "bad input", which is what operators script against).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Edge WebSocket proxy for AI-agent fleets", long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a configuration file.
    Run {
        /// Configuration file (TOML); see config/portcullis.toml for every key.
        #[arg(long, short, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and exit: 0 when valid, 64 with the file, line and key when not.
    CheckConfig {
        /// Configuration file to check.
        file: PathBuf,
        /// Check the file alone: do not read the certificates, keys, CA files and secrets it
        /// names (a Kubernetes ConfigMap's file, whose Secrets are mounted only in the pod).
        #[arg(long)]
        syntax_only: bool,
    },
    /// Run the proxy in front of a built-in demo agent, with a generated certificate.
    Demo {
        /// Proxy listen address (TLS).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Admin listen address (/metrics, /live, /ready).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Demo agent backend address.
        #[arg(long, default_value = "127.0.0.1:7681")]
        backend: SocketAddr,
        /// Where the generated certificate and key are written.
        #[arg(long, default_value = "target/portcullis-demo")]
        dir: PathBuf,
        /// Only run the demo agent backend (for use with `run --config config/dev.toml`).
        #[arg(long)]
        backend_only: bool,
        /// The program the demo terminal runs on its PTY.
        #[arg(long, default_value_t = default_shell())]
        shell: String,
        /// Do not install xterm.js with npm when it is missing (the page then shows a plain
        /// terminal).
        #[arg(long)]
        no_npm: bool,
        /// How long a terminal whose connection dropped is held for the page to reconnect
        /// (`[routes.resume] window`).
        #[arg(long, default_value = "30s", value_parser = demo_duration)]
        resume_window: String,
        /// Another origin the page may be opened from (a port forward in front of the demo);
        /// repeatable.
        #[arg(long = "origin", value_parser = demo_origin)]
        origins: Vec<String>,
    },
    /// Token tools.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Open a WebSocket, send each line of stdin as a text message, print what comes back.
    Connect {
        /// ws:// or wss:// URL.
        url: String,
        /// PEM file of the CA (or self-signed certificate) to trust for wss://. A server
        /// certificate that is itself in the file is trusted as such (as curl does), even a
        /// CA:TRUE one from `openssl req -x509`; its names must still match the URL's host.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Trust the operating system's root certificates too (for a proxy with a public
        /// certificate).
        #[arg(long)]
        system_roots: bool,
        /// What ends each line sent: `auto` sends a carriage return (Enter) on a URL whose path
        /// ends in /terminal, nothing otherwise.
        #[arg(long, value_enum, default_value = "auto")]
        eol: client::Eol,
        /// Extra request header, `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Ask a running proxy's admin listener whether it is live (or, with its `/ready` URL,
    /// ready): exit 0 when it answers 200, 1 when it answers anything else or nothing. For
    /// container health checks in an image that has no shell and no curl.
    Health {
        /// The admin endpoint to ask.
        #[arg(long, default_value = "http://127.0.0.1:9090/live")]
        url: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Sign a JWT and print it (for tests and operators).
    Mint {
        /// PEM private key file (RS*, PS*, ES*, EdDSA).
        #[arg(long, conflicts_with = "secret_env", required_unless_present = "secret_env")]
        key: Option<PathBuf>,
        /// Environment variable holding the HMAC secret (HS*).
        #[arg(long)]
        secret_env: Option<String>,
        /// Algorithm: HS256/384/512, RS256/384/512, PS256/384/512, ES256, ES384, EdDSA.
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// Subject (`sub`).
        #[arg(long)]
        sub: Option<String>,
        /// Extra claim `name=value`; the value is JSON when it parses as JSON, else a string.
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
        /// Lifetime (`exp` = now + ttl).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Key id (`kid` header).
        #[arg(long)]
        kid: Option<String>,
        /// Issuer (`iss`).
        #[arg(long)]
        iss: Option<String>,
        /// Audience (`aud`).
        #[arg(long)]
        aud: Option<String>,
    },
}

/// The runtime for `configured` worker threads (0: `TOKIO_WORKER_THREADS` when set, else one
/// per core) in `model`. One worker is tokio's current-thread runtime on the main thread: the
/// process is then a single thread, like an NGINX worker (what it hands to tokio's blocking
/// pool aside, on threads named `pc-blocking`), and the kernel skips the reference count that a
/// descriptor table shared between threads costs at every system call. Against the
/// multi-thread runtime with one worker: 2-7 % less CPU per new plain session, and no
/// difference on the relay, plain or TLS, that the runs can resolve (BENCHMARKS.md). More
/// workers: the multi-thread runtime, or in the thread-per-core model the same current-thread
/// runtime on the main thread (worker 0), which `Server::serve` joins with one more thread and
/// runtime per further worker.
fn runtime_builder(configured: usize, model: WorkerModel) -> tokio::runtime::Builder {
    let one = model == WorkerModel::ThreadPerCore
        || match configured {
            // Read as tokio reads it; a value tokio refuses is left for tokio to refuse.
            0 => match std::env::var_os("TOKIO_WORKER_THREADS") {
                Some(v) => v.to_str().and_then(|v| v.parse::<usize>().ok()) == Some(1),
                // Tokio counts one core when the count is unknown.
                None => std::thread::available_parallelism().map_or(true, |n| n.get() == 1),
            },
            n => n == 1,
        };
    if one {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.thread_name("pc-blocking");
        return builder;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if configured > 0 {
        builder.worker_threads(configured);
    }
    builder
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    // `run` reads its configuration first: it may set the number of worker threads.
    let config = match &cli.command {
        Command::Run { config: path } => match Config::load(path) {
            // Every file the configuration names is read as check-config reads it: the same
            // problem gets the same message and the same exit code from both.
            Ok(c) => {
                if !files_readable(path, &c) {
                    return ExitCode::from(EXIT_CONFIG);
                }
                Some(c)
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => None,
    };
    let (workers, model) =
        config.as_ref().map_or((0, WorkerModel::WorkStealing), |c| (c.server.worker_threads, c.server.worker_model));
    let runtime = match runtime_builder(workers, model).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::CheckConfig { file, syntax_only } => match match syntax_only {
            true => Config::load_unread_secrets(&file),
            false => Config::load(&file),
        } {
            Ok(c) => {
                if !syntax_only && !files_readable(&file, &c) {
                    return ExitCode::from(EXIT_CONFIG);
                }
                for w in c.warnings() {
                    eprintln!("{}: warning: {w}", file.display());
                }
                let files = if syntax_only { "files not read" } else { "every file it names read" };
                let base = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
                println!(
                    "{}: ok ({} listeners, {} routes; {files}; relative paths resolve against the working directory {base})",
                    file.display(),
                    c.listeners.len(),
                    c.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config: path } => match config {
            Some(config) => report(runtime.block_on(run(config, path))),
            None => ExitCode::FAILURE, // loaded above
        },
        Command::Demo { listen, admin, backend, dir, backend_only, shell, no_npm, resume_window, origins } => {
            let opts = DemoOpts { backend_only, shell, npm: !no_npm, resume_window, origins };
            report(runtime.block_on(demo(listen, admin, backend, &dir, opts)))
        }
        Command::Token { command: TokenCommand::Mint { key, secret_env, alg, sub, claims, ttl, kid, iss, aud } } => {
            report(mint(key.as_deref(), secret_env.as_deref(), &alg, sub, &claims, ttl, kid.as_deref(), iss, aud))
        }
        Command::Connect { url, ca, system_roots, eol, headers } => {
            let trust = client::Trust { ca: ca.as_deref(), system_roots };
            report(runtime.block_on(client::run(&url, trust, eol, &headers)))
        }
        Command::Health { url, timeout_ms } => report(runtime.block_on(health(&url, timeout_ms))),
    }
}

#[allow(clippy::too_many_arguments)]
fn mint(
    key: Option<&Path>,
    secret_env: Option<&str>,
    alg: &str,
    sub: Option<String>,
    claims: &[String],
    ttl: std::time::Duration,
    kid: Option<&str>,
    iss: Option<String>,
    aud: Option<String>,
) -> anyhow::Result<()> {
    use std::str::FromStr;
    let alg = jsonwebtoken::Algorithm::from_str(alg).map_err(|_| anyhow::anyhow!("unknown algorithm {alg}"))?;
    let material = match (key, secret_env) {
        (Some(path), _) => std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        (None, Some(var)) => std::env::var(var).with_context(|| format!("{var} is not set"))?.into_bytes(),
        (None, None) => anyhow::bail!("give --key FILE or --secret-env VAR"),
    };
    let key = mint::encoding_key(alg, &material).context("unusable key for this algorithm")?;
    let mut map = serde_json::Map::new();
    for c in claims {
        let (name, value) = c.split_once('=').context("claims are written name=value")?;
        let v = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
        map.insert(name.to_owned(), v);
    }
    for (name, v) in [("sub", sub), ("iss", iss), ("aud", aud)] {
        if let Some(v) = v {
            map.insert(name.to_owned(), serde_json::Value::String(v));
        }
    }
    println!("{}", mint::mint(alg, &key, kid, map, ttl)?);
    Ok(())
}

/// `portcullis health`: one GET of the admin endpoint, 200 or an error.
async fn health(url: &str, timeout_ms: u64) -> anyhow::Result<()> {
    let said = server::health_check(url, std::time::Duration::from_millis(timeout_ms))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!("{said}");
    Ok(())
}

/// Reads every file `config` names, as `run` will load it; prints each problem on a line of its
/// own, prefixed with the configuration's path. True when there is none.
fn files_readable(path: &Path, config: &Config) -> bool {
    let problems = server::check_files(config);
    for p in &problems {
        eprintln!("{}: {p}", path.display());
    }
    problems.is_empty()
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("portcullis=info"));
    // Colours only for a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    raise_descriptor_limit();
    tracing::info!(config = %path.display(), summary = %server::summary(&config), "configuration in force");
    for w in config.warnings() {
        tracing::warn!(config = %path.display(), "{w}");
    }
    // Started by a running process's handover (SIGUSR2): take its sockets, once this
    // configuration has loaded (a refused one has already exited, and the old process serves on).
    let (bound, ready) = match std::env::var_os(portcullis::handover::ENV) {
        Some(socket) => {
            let (bound, ready) = portcullis::handover::receive(&config, Path::new(&socket))?;
            (bound, Some(ready))
        }
        None => (Bound::bind(&config).await?, None),
    };
    let sockets = bound.handover_sockets(&config)?;
    let poll = config.server.reload_poll_interval;
    let runtime_dir = config.server.runtime_dir.clone();
    // Once the sockets are bound: a process that cannot bind them never touches the fleet's
    // store. The workers' threads start here, before the old process is told to stop accepting.
    let server = server::Server::new(config).await?;
    tokio::spawn(server::watch_config(server.handle(), path.clone(), poll));
    if let Some(ready) = ready {
        // The sockets listen already (connections wait in their queue): the old process may
        // stop accepting now.
        ready.ready()?;
        tracing::info!("handover: serving; the previous process drains");
    }
    server.serve(bound, shutdown_or_handover(sockets, path, runtime_dir)).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, or once a handover to a new process (SIGUSR2) has succeeded:
/// then this process drains. A failed handover is logged and this process serves on.
async fn shutdown_or_handover(
    sockets: Vec<(String, SocketAddr, std::os::fd::OwnedFd)>,
    config_path: PathBuf,
    runtime_dir: Option<PathBuf>,
) -> server::Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        shutdown_signal().await;
        return server::Stop::Shutdown;
    };
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return server::Stop::Shutdown,
            _ = usr2.recv() => {
                let copies: std::io::Result<Vec<_>> = sockets
                    .iter()
                    .map(|(n, a, fd)| Ok((n.clone(), *a, fd.try_clone()?)))
                    .collect();
                let result = match copies {
                    Ok(copies) => {
                        portcullis::handover::hand_over(&own_binary(), &config_path, runtime_dir.as_deref(), copies).await
                    }
                    Err(e) => Err(e.into()),
                };
                match result {
                    Ok(()) => {
                        tracing::info!("handover: the new process is serving; draining");
                        return server::Stop::HandedOver;
                    }
                    Err(e) => tracing::error!(error = %e, "handover failed; serving on"),
                }
            }
        }
    }
}

/// The path this binary was started from (after an upgrade replaced the file, the new one;
/// Linux then reports the old file as "(deleted)").
fn own_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("portcullis"));
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `$SHELL` when it is set, else `/bin/bash` when it exists, else `/bin/sh`.
fn default_shell() -> String {
    std::env::var("SHELL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" }.to_owned())
}

/// How the demo runs.
struct DemoOpts {
    backend_only: bool,
    shell: String,
    npm: bool,
    resume_window: String,
    origins: Vec<String>,
}

/// A duration as the configuration writes it (`30s`, `500ms`, `2m`): digits, then a unit.
fn demo_duration(s: &str) -> Result<String, String> {
    let unit = s.trim_start_matches(|c: char| c.is_ascii_digit());
    let ok = unit.len() < s.len() && ["ms", "s", "m", "h"].contains(&unit);
    ok.then(|| s.to_owned()).ok_or_else(|| format!("{s:?} is not a duration such as 30s or 500ms"))
}

/// An origin: `https://host[:port]`, with nothing a TOML string would need escaped.
fn demo_origin(s: &str) -> Result<String, String> {
    let ok = s.starts_with("https://") && s[8..].bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    ok.then(|| s.to_owned()).ok_or_else(|| format!("{s:?} is not an origin such as https://localhost:9443"))
}

/// The soft descriptor limit raised to the hard one, before the server sizes its budget from it.
fn raise_descriptor_limit() {
    match portcullis::limits::raise_descriptor_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(before = ?before, after = ?after, "descriptor limit raised to the hard limit");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit to the hard limit"),
    }
}

async fn demo(
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
    opts: DemoOpts,
) -> anyhow::Result<()> {
    let DemoOpts { backend_only, shell, npm, resume_window, origins } = opts;
    let backend_listener = tokio::net::TcpListener::bind(backend)
        .await
        .with_context(|| format!("cannot bind the demo backend on {backend}"))?;
    // Port 0 means any free port: the configuration, the page's origins and the banner name
    // the ports actually bound.
    let backend = backend_listener.local_addr()?;
    let web_dir = dir.to_owned();
    let xterm = tokio::task::spawn_blocking(move || demo::web::ensure_installed(&web_dir, npm)).await?;
    let agent = std::sync::Arc::new(demo::agent::Agent::new(shell.clone(), xterm.as_ref().ok().cloned()));
    let backend_task = tokio::spawn(demo::agent::serve(backend_listener, agent));
    raise_descriptor_limit();
    if backend_only {
        eprintln!("demo agent backend listening on http://{backend} (Ctrl-C to stop)");
        shutdown_signal().await;
        backend_task.abort();
        return Ok(());
    }
    let cert = demo::write_self_signed(dir)?;
    let jwt = demo::write_jwt_keys(dir)?;
    let token = demo::mint_token(&jwt, "demo", std::time::Duration::from_secs(3600))?;
    let bind = |addr: SocketAddr, what: &str| {
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot bind the demo's {what} on {addr}"))
    };
    let (listen_socket, admin_socket) = (bind(listen, "proxy")?, bind(admin, "admin listener")?);
    let (listen, admin) = (listen_socket.local_addr()?, admin_socket.local_addr()?);
    let mut sockets = vec![(listen, listen_socket), (admin, admin_socket)];
    let page = demo::PageOpts { resume_window, origins };
    let text = demo::config_text(listen, admin, backend, &cert, &jwt, &page, &dir.join("state"));
    let config = Config::parse(&text, Path::new("<demo>"))?;
    let bound = Bound::bind_with(&config, |_, addr| {
        sockets.iter().position(|(a, _)| *a == addr).map(|i| sockets.swap_remove(i).1)
    })?;
    let exe = "cargo run --release --";
    let page_note = match &xterm {
        Ok(_) => "xterm.js installed from the npm registry".to_owned(),
        Err(why) => format!("plain terminal: {why}"),
    };
    // A reader that stopped reading (a closed pipe) must not bring the demo down.
    let _ = writeln!(
        std::io::stdout(),
        "\nPortcullis demo is running.\n\n\
         Open the agent's page (trust the certificate below, or accept the browser's warning):\n\n\
         \x20 https://localhost:{port}/.portcullis/login#token={token}&next=/agents/demo/\n\n\
         \x20 ({page_note}; the token is in the URL fragment, which browsers never send;\n\
         \x20 the proxy's login page turns it into an HttpOnly cookie that no page script can read)\n\n\
         \x20 proxy (TLS)   wss://localhost:{port}/agents/demo/terminal   (a shell on a PTY: {shell})\n\
         \x20               wss://localhost:{port}/agents/demo/events     (an agent event every second)\n\
         \x20               wss://localhost:{port}/agents/demo/echo       (echo, for load tests)\n\
         \x20               https://localhost:{port}/agents/demo/api/...  (REST: status, tasks; SSE: tasks/ID/output)\n\
         \x20 admin         http://{admin}/metrics  /live  /ready  /sessions\n\
         \x20 demo agent    http://{backend} (loopback only)\n\
         \x20 certificate   {cert} (self-signed; trust it as the CA)\n\n\
         Every route but the page requires a JWT that grants the agent (claim \"agents\"). A token\n\
         for agent \"demo\", valid for one hour (signing key: {jwt_key}):\n\n\
         \x20 TOKEN={token}\n\n\
         Try it:\n\n\
         \x20 curl --cacert {cert} -H \"Authorization: Bearer $TOKEN\" https://localhost:{port}/agents/demo/api/status\n\
         \x20 curl --cacert {cert} -H \"Authorization: Bearer $TOKEN\" -d '{{\"steps\":5}}' https://localhost:{port}/agents/demo/api/tasks\n\
         \x20 curl --cacert {cert} -H \"Authorization: Bearer $TOKEN\" -N https://localhost:{port}/agents/demo/api/tasks/1/output\n\
         \x20 {exe} connect wss://localhost:{port}/agents/demo/echo --ca {cert} -H \"Authorization: Bearer $TOKEN\"\n\
         \x20 {exe} connect wss://localhost:{port}/agents/demo/events --ca {cert} -H \"Authorization: Bearer $TOKEN\"\n\
         \x20 {exe} connect wss://localhost:{port}/agents/other/echo --ca {cert} -H \"Authorization: Bearer $TOKEN\"   (403)\n\
         \x20 curl -s http://{admin}/sessions\n\n\
         Mint more: {exe} token mint --key {jwt_key} --alg ES256 --sub you --claim agents='[\"demo\"]' --ttl 15m\n\n\
         Ctrl-C drains the sessions and stops.\n",
        port = listen.port(),
        cert = cert.cert.display(),
        jwt_key = jwt.private_key.display(),
    );
    server::serve(config, bound, shutdown_signal()).await?;
    backend_task.abort();
    Ok(())
}
