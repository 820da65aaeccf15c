//! The `sluice` command: `run` (serve, reload, drain, upgrade), `check` (validate a config),
//! `heartbeat` (announce agents, as an agent would), `resources` (read the heartbeat table),
//! `demo` (a self-contained edge with its own backends).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice::control::handover;
use sluice::control::server::{RunOptions, Server};
use sluice::edge::listener;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "ALPN/SNI-routing TLS-passthrough edge for reverse-tunnel clusters"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax); RUST_LOG works too.
    #[arg(long, global = true, env = "SLUICE_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge.
    Run {
        #[arg(long, short, default_value = "conf/sluice.toml")]
        config: PathBuf,
        /// Take the listening sockets over from the sluice running with the same
        /// `lifecycle.upgrade_socket`, then tell it to drain (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Wait, then exit 0: a Kubernetes preStop hook in an image without a shell
    /// (`sluice sleep 30s`).
    Sleep {
        /// How long, e.g. `30s`, `1m`.
        duration: String,
    },
    /// Validate a config; print every problem as path:line: key: problem — fix, exit 1.
    Check {
        #[arg(long, short, default_value = "conf/sluice.toml")]
        config: PathBuf,
        /// Do not look host names up (CI outside the cluster): they are checked for form only.
        #[arg(long)]
        no_resolve: bool,
    },
    /// Announce an agent's resources to sluice's heartbeat API (runs beside the service).
    Heartbeat {
        #[arg(long, short, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Print the heartbeat table of a running sluice: each resource with its agents.
    Resources {
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
    /// The agents of a running sluice's heartbeat table.
    Agents {
        #[command(subcommand)]
        what: AgentsCommand,
    },
    /// Everything in one process: the edge on 127.0.0.1:8443 and two demo TLS backends.
    Demo {
        #[arg(long, default_value_t = 8443)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

fn init_logging(format: LogFormat, level: &str) -> sluice::observe::logging::LogGuard {
    sluice::observe::logging::init(matches!(format, LogFormat::Json), level)
}

fn raise_nofile() {
    // Each relayed connection holds two descriptors: use all the hard limit allows.
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::increase_nofile_limit(hard);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sleep { duration } => match humantime::parse_duration(&duration) {
            Ok(d) => {
                std::thread::sleep(d);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice sleep: `{duration}`: {e} (write e.g. 30s)");
                ExitCode::from(2)
            }
        },
        Command::Check { config, no_resolve } => match sluice::config::load_with(
            &config,
            if no_resolve {
                sluice::config::Names::Skip
            } else {
                sluice::config::Names::Resolve
            },
        ) {
            Ok(c) => {
                // It may run on another machine: a warning, with this machine's numbers.
                let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, h)| h);
                if let Err(why) = c.check_fd_budget(hard) {
                    eprintln!("{}: warning: {why}", config.display());
                }
                println!(
                    "{}: ok ({} listeners, {} routes, {} pools)",
                    config.display(),
                    c.listeners.len(),
                    c.routes.len(),
                    c.pools.len()
                );
                ExitCode::SUCCESS
            }
            Err(errs) => {
                for e in &errs.0 {
                    eprintln!("{e}");
                }
                ExitCode::from(1)
            }
        },
        Command::Run { config, upgrade } => {
            let _log = init_logging(cli.log_format, &cli.log_level);
            raise_nofile();
            let cfg = match sluice::config::load(&config) {
                Ok(c) => c,
                Err(errs) => {
                    for e in &errs.0 {
                        eprintln!("{e}");
                    }
                    return ExitCode::from(1);
                }
            };
            // As HAProxy does: a cap the open-file limit cannot honour is refused at start,
            // rather than discovered as failed connections under load.
            if let Err(why) = cfg.check_fd_budget(sluice::net::nofile()) {
                eprintln!("sluice: {}: {why}", config.display());
                return ExitCode::from(1);
            }
            let (mut inherited, mut inherited_udp) = match handover::from_systemd() {
                Ok(s) => (s.tcp, s.udp),
                Err(e) => {
                    eprintln!("sluice: socket activation: {e}");
                    return ExitCode::from(1);
                }
            };
            // systemd keeps its own copy of each socket listening: one that no listener
            // claims would queue clients forever.
            let names = inherited.keys().chain(inherited_udp.keys());
            if let Some(name) = names.clone().find(|n| cfg.listener(n).is_none()) {
                eprintln!(
                    "sluice: socket activation: the socket named `{name}` matches no [[listener]] \
                     in {}; name the listener `{name}` or change FileDescriptorName",
                    config.display()
                );
                return ExitCode::from(1);
            }
            let mut takeover = None;
            let mut relays = std::collections::HashMap::new();
            if upgrade {
                let Some(path) = cfg.lifecycle.upgrade_socket.clone() else {
                    eprintln!(
                        "sluice: --upgrade needs lifecycle.upgrade_socket in {}",
                        config.display()
                    );
                    return ExitCode::from(1);
                };
                match handover::take_over(&path) {
                    Ok(mut t) => {
                        tracing::info!(
                            old_pid = t.old_pid,
                            sockets = t.sockets.len(),
                            "upgrade: took the listening sockets over"
                        );
                        // A listener whose address changed binds anew (the old process keeps
                        // the old socket until it has drained).
                        for (name, sock) in std::mem::take(&mut t.sockets) {
                            if takes_over(&cfg, &name, sock.local_addr(), false) {
                                inherited.insert(name, sock);
                            } else {
                                tracing::info!(socket = %name,
                                    "upgrade: not taking this socket over: not in the new config at that address");
                            }
                        }
                        // A QUIC listener's socket, and its pair end toward the old process
                        // (dropped with the socket: the old one then keeps reading its own).
                        for (name, sock) in std::mem::take(&mut t.udp) {
                            if takes_over(&cfg, &name, sock.local_addr(), true) {
                                if let Some(relay) = t.relays.remove(&name) {
                                    relays.insert(name.clone(), relay);
                                }
                                inherited_udp.insert(name, sock);
                            } else {
                                tracing::info!(socket = %name,
                                    "upgrade: not taking this QUIC socket over: not in the new config at that address");
                            }
                        }
                        t.relays.clear();
                        takeover = Some(t);
                    }
                    Err(e) => {
                        eprintln!("sluice: upgrade: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            // SIGUSR2 runs this same command with --upgrade.
            let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            if !upgrade {
                args.push("--upgrade".into());
            }
            let upgrade_command = std::env::current_exe().ok().map(|exe| (exe, args));
            run(async move {
                let server = Server::start_upgraded(cfg, inherited, inherited_udp, relays).await?;
                server
                    .run_until_signal(RunOptions {
                        takeover,
                        upgrade_command,
                    })
                    .await
            })
        }
        Command::Heartbeat { config } => {
            let _log = init_logging(cli.log_format, &cli.log_level);
            run(async move { sluice::agents::client::run(&config).await })
        }
        Command::Agents {
            what: AgentsCommand::Versions { admin },
        } => run(async move {
            print!("{}", sluice::agents::client::print_versions(&admin).await?);
            Ok(())
        }),
        Command::Resources { admin } => run(async move {
            print!("{}", sluice::agents::client::print_resources(&admin).await?);
            Ok(())
        }),
        Command::Demo { port, admin } => {
            let _log = init_logging(cli.log_format, &cli.log_level);
            raise_nofile();
            run(sluice::demo::run(port, &admin))
        }
    }
}

#[derive(clap::Subcommand)]
enum AgentsCommand {
    /// How far a rollout has got: agents by version and state, and the skewed ones and why.
    Versions {
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

/// Upgrade: whether the new config has a listener (`quic`: a QUIC one), or the admin or
/// heartbeat API, of the name a socket was handed over under, at that socket's address.
fn takes_over(
    cfg: &sluice::config::Config,
    name: &str,
    have: std::io::Result<std::net::SocketAddr>,
    quic: bool,
) -> bool {
    let wanted = match name {
        handover::ADMIN => cfg.admin.address,
        handover::HEARTBEAT => cfg.heartbeat.address,
        _ => cfg
            .listener(name)
            .filter(|l| (l.protocol == sluice::config::ListenerProtocol::Quic) == quic)
            .map(|l| l.address),
    };
    matches!((wanted, have), (Some(w), Ok(have)) if listener::addresses_agree(w, have))
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(fut);
    // Do not wait for blocking threads (e.g. an upgrade conversation) to end.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::from(1)
        }
    }
}
