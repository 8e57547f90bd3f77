//! `chimera up` end to end, as a user runs it: the examples on a real RabbitMQ, a load burst
//! from `chimera load`, a worker head scaling out and back in, every command processed exactly
//! once (counted through the query heads), the dashboard's charts drawn in headless Chromium,
//! and nothing left running after SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chimera_runtime::local::load::Summary;
use chimera_runtime::local::snapshot::{Snapshot, UpFile};
use chimera_testenv::{TestVhost, free_port, unique_name};
use common::eventually;

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chimera"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// Copies the marketplace examples `names` into `dir` (so that a test can edit them).
fn copy_examples(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for name in names {
        std::fs::copy(
            repo(&format!("examples/marketplace/{name}.yaml")),
            dir.join(format!("{name}.yaml")),
        )
        .unwrap();
    }
}

/// Three consecutive ports nobody listens on.
fn free_ports(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base < 60000
            && (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

struct Up {
    child: Child,
    state: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        if let Ok(file) = UpFile::read(&self.state) {
            for pid in file.pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

async fn snapshot(dashboard: &str) -> Option<Snapshot> {
    reqwest::get(format!("{dashboard}/api/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Waits until the users query head lists exactly `expected` users whose id starts with
/// `prefix`, and returns the count.
async fn count_users(http: &reqwest::Client, base: &str, prefix: &str, expected: u64) -> u64 {
    eventually(
        &format!("{expected} users {prefix}*"),
        Duration::from_secs(120),
        || async {
            let (mut seen, mut after) = (0u64, prefix.to_owned());
            loop {
                let page: serde_json::Value = http
                    .get(format!("{base}/users?limit=500&after={after}"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let items = page["items"].as_array()?;
                seen += items
                    .iter()
                    .filter(|u| {
                        u["user_id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with(prefix))
                    })
                    .count() as u64;
                match page["next"].as_str() {
                    Some(next) if next.starts_with(prefix) => after = next.to_owned(),
                    _ => break,
                }
            }
            (seen == expected).then_some(seen)
        },
    )
    .await
}

#[tokio::test]
async fn chimera_up_runs_scales_and_stops_cleanly() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    for program in ["users", "gigs", "orders"] {
        assert!(
            bin_dir().join(program).is_file(),
            "the module program {program} is not built in {}: run `cargo build -p chimera-users -p chimera-gigs -p chimera-orders` (scripts/test does)",
            bin_dir().display()
        );
    }
    let vhost = TestVhost::create("up");
    let state = std::env::temp_dir().join(unique_name("chimera-up"));
    // A copy of the examples, so that the test can edit one.
    let modules = state.with_extension("modules");
    copy_examples(&modules, &["users", "gigs", "orders"]);
    let dashboard_port = free_port();
    let base = free_ports(3);
    let child = start_up(&state, &modules, &vhost, dashboard_port, base);
    let mut up = Up {
        child,
        state: state.clone(),
    };
    let dashboard = format!("http://127.0.0.1:{dashboard_port}");
    let ready = eventually(
        "every query head ready",
        Duration::from_secs(60),
        || async {
            let s = snapshot(&dashboard).await?;
            let queries: Vec<_> = s
                .modules
                .iter()
                .flat_map(|m| m.heads.iter().filter(|h| h.head == "query"))
                .collect();
            (queries.len() == 3 && queries.iter().all(|h| h.ready >= 1)).then_some(s)
        },
    )
    .await;
    let users_url = ready
        .modules
        .iter()
        .find(|m| m.domain == "users")
        .and_then(|m| m.heads.iter().find_map(|h| h.url.clone()))
        .unwrap();
    let minimum: std::collections::BTreeMap<String, u32> = ready
        .modules
        .iter()
        .flat_map(|m| {
            m.heads
                .iter()
                .filter(|h| h.head == "worker")
                .map(|h| (m.domain.clone(), h.min.max(1)))
        })
        .collect();

    // `chimera status` finds it.
    let status = Command::new(env!("CARGO_BIN_EXE_chimera"))
        .args(["status", "--json", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let parsed: Snapshot = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(parsed.modules.len(), 3);

    // 3,000 registrations at once, while the users worker idles at zero replicas.
    let connection = chimera_sdk::broker::connect(&vhost.amqp_url, "up-test")
        .await
        .unwrap();
    let publisher = chimera_sdk::broker::Publisher::open(&connection)
        .await
        .unwrap();
    let burst_run = unique_name("b");
    let burst: Vec<_> = (0..3000)
        .map(|i| {
            chimera_sdk::broker::Outgoing::new(
                "chimera.users.commands",
                chimera_sdk::envelope::Envelope::new(
                    "user.register",
                    serde_json::json!({"user_id": format!("u-{burst_run}-{i}"), "name": "Burst", "email": "b@example.com"}),
                ),
            )
        })
        .collect();
    publisher.publish_all(&burst, true).await.unwrap();
    let scaled = eventually(
        "the users worker scales out",
        Duration::from_secs(30),
        || async {
            let s = snapshot(&dashboard).await?;
            let users = s.modules.iter().find(|m| m.domain == "users")?;
            let worker = users.heads.iter().find(|h| h.head == "worker")?;
            (worker.replicas > 1).then_some(worker.replicas)
        },
    )
    .await;
    eprintln!("users worker scaled out to {scaled}");
    connection.close(200, "done".into()).await.ok();
    // The burst drains before the load starts: every registration processed once, and the
    // load's first gigs do not wait behind 3,000 registrations for their seller (the gigs
    // module retries an unknown seller for 71 s, then dead-letters the gig, as its retry
    // policy says; a loaded machine can take longer than that to drain the burst).
    let http = reqwest::Client::new();
    assert_eq!(
        count_users(&http, &users_url, &format!("u-{burst_run}-"), 3000).await,
        3000
    );

    // Marketplace traffic, from a second process, as a user would run it.
    let load = tokio::task::spawn_blocking({
        let state = state.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_chimera"))
                .args([
                    "load",
                    "--profile",
                    "burst",
                    "--rate",
                    "1000",
                    "--duration",
                    "15s",
                    "--json",
                    "--state-dir",
                ])
                .arg(&state)
                .stderr(Stdio::null())
                .output()
                .unwrap()
        }
    });
    let out = load.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let summary: Summary = serde_json::from_slice(&out.stdout).unwrap();
    // How many a busy machine manages is not the product's behaviour (bench/ measures speed);
    // that everything sent is confirmed, and then processed once (below), is.
    eprintln!(
        "load: sent {} of {} asked ({:.0}/s achieved)",
        summary.sent, summary.asked, summary.achieved_rate
    );
    assert_eq!(summary.sent, summary.confirmed, "{summary:?}");
    assert_eq!(summary.errors, 0, "{summary:?}");
    assert!(summary.sent <= summary.asked, "{summary:?}");
    assert_eq!(
        summary.commands.values().sum::<u64>(),
        summary.confirmed,
        "{summary:?}"
    );
    assert!(
        summary.commands.get("gig.publish").is_some_and(|&n| n > 0),
        "the flow reached the gigs: {summary:?}"
    );

    // The dashboard draws its charts (headless Chromium, no network beyond this machine).
    let dom = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("{dashboard}/"))
        .output()
        .expect("chromium is not installed: run scripts/install-tools (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    let drawn = dom.matches("data-points=\"").count();
    let nonempty = dom
        .split("data-points=\"")
        .skip(1)
        .filter(|rest| {
            rest.split('"')
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0)
                > 0
        })
        .count();
    assert!(drawn >= 12, "12 charts (2 per head): {drawn}\n{dom}");
    assert!(
        nonempty >= 12,
        "every chart shows data: {nonempty} of {drawn}"
    );

    // Every registration of the load processed exactly once: the users query head lists
    // them all, once.
    let registered = summary.commands["user.register"];
    let prefix = format!("u-{}-", summary.run);
    let count = count_users(&http, &users_url, &prefix, registered).await;
    assert_eq!(count, registered);
    // Gigs: each one published is there.
    let gigs_url = ready
        .modules
        .iter()
        .find(|m| m.domain == "gigs")
        .and_then(|m| m.heads.iter().find_map(|h| h.url.clone()))
        .unwrap();
    // (processed asynchronously: the gigs worker may still be draining the load's tail)
    for n in [1, summary.commands["gig.publish"]] {
        let url = format!("{gigs_url}/gigs/g-{}-{n}", summary.run);
        eventually(
            &format!("gig {n} readable"),
            Duration::from_secs(60),
            || async {
                let r = http.get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await;
    }

    // The burst is over: the worker heads come back to their floor.
    eventually("worker heads back in", Duration::from_secs(90), || async {
        let s = snapshot(&dashboard).await?;
        s.modules
            .iter()
            .all(|m| {
                m.heads
                    .iter()
                    .filter(|h| h.head == "worker")
                    .all(|h| h.replicas <= minimum[&m.domain])
            })
            .then_some(())
    })
    .await;

    // An edited module is re-applied; the others keep their processes.
    let before = snapshot(&dashboard).await.unwrap();
    let pids_of = |s: &Snapshot, domain: &str| -> Vec<u32> {
        s.modules
            .iter()
            .filter(|m| m.domain == domain)
            .flat_map(|m| m.heads.iter().flat_map(|h| h.pids.clone()))
            .collect()
    };
    let gigs_yaml = modules.join("gigs.yaml");
    let text = std::fs::read_to_string(&gigs_yaml).unwrap();
    assert!(text.contains("replicas: {min: 1, max: 5}"), "{text}");
    std::fs::write(
        &gigs_yaml,
        text.replacen(
            "replicas: {min: 1, max: 5}",
            "replicas: {min: 2, max: 5}",
            1,
        ),
    )
    .unwrap();
    eventually(
        "the gigs query head at 2 replicas",
        Duration::from_secs(30),
        || async {
            let s = snapshot(&dashboard).await?;
            let gigs = s.modules.iter().find(|m| m.domain == "gigs")?;
            let query = gigs.heads.iter().find(|h| h.head == "query")?;
            (query.replicas == 2 && query.min == 2).then_some(())
        },
    )
    .await;
    let after = snapshot(&dashboard).await.unwrap();
    for domain in ["users", "orders"] {
        // No new process (replicas that were draining may have finished meanwhile).
        let (was, is) = (pids_of(&before, domain), pids_of(&after, domain));
        assert!(
            !is.is_empty() && is.iter().all(|p| was.contains(p)),
            "{domain} was not restarted: {was:?} -> {is:?}"
        );
    }

    // SIGTERM: everything stops, nothing is left behind.
    let pids = UpFile::read(&state).unwrap().pids;
    assert!(pids.len() >= 4, "{pids:?}");
    Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            assert!(status.success(), "chimera up exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "chimera up did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(UpFile::read(&state).is_err(), "the state file is removed");
    std::fs::remove_dir_all(&state).ok();
    std::fs::remove_dir_all(&modules).ok();
}

fn start_up(
    state: &Path,
    modules: &Path,
    vhost: &TestVhost,
    dashboard_port: u16,
    query_base_port: u16,
) -> Child {
    up_command(state, modules, vhost, dashboard_port, query_base_port)
        .spawn()
        .unwrap()
}

/// SIGTERM to `chimera up`: it exits 0; its state and the test's copy of the modules go.
fn stop_cleanly(up: &mut Up, modules: &Path) {
    Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    let status = up.child.wait().unwrap();
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&up.state).ok();
    std::fs::remove_dir_all(modules).ok();
}

/// `chimera up` of the modules in `modules` on the test's vhost, as a user runs it.
fn up_command(
    state: &Path,
    modules: &Path,
    vhost: &TestVhost,
    dashboard_port: u16,
    query_base_port: u16,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chimera"));
    command
        .args(["up", "-f"])
        .arg(modules)
        .arg("--state-dir")
        .arg(state)
        .args(["--dashboard-port", &dashboard_port.to_string()])
        .args(["--query-base-port", &query_base_port.to_string()])
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--quiet")
        .env("CHIMERA_AMQP_URL", &vhost.amqp_url)
        .env("CHIMERA_RABBITMQ_MANAGEMENT_URL", vhost.management_url())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

#[tokio::test]
async fn a_second_up_after_a_crash_recovers() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    assert!(
        bin_dir().join("users").is_file(),
        "the module program users is not built: run `cargo build -p chimera-users`"
    );
    let vhost = TestVhost::create("up-crash");
    let state = std::env::temp_dir().join(unique_name("chimera-up-crash"));
    let modules = state.with_extension("modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::copy(
        repo("examples/marketplace/users.yaml"),
        modules.join("users.yaml"),
    )
    .unwrap();
    let port = free_port();
    let dashboard = format!("http://127.0.0.1:{port}");
    let query_ready = || async {
        let s = snapshot(&dashboard).await?;
        let users = s.modules.iter().find(|m| m.domain == "users")?;
        let query = users.heads.iter().find(|h| h.head == "query")?;
        (query.ready >= 1).then(|| query.pids.clone())
    };

    let mut first = Up {
        child: start_up(&state, &modules, &vhost, port, free_ports(1)),
        state: state.clone(),
    };
    let orphans = eventually("the first up serves", Duration::from_secs(60), query_ready).await;
    // A crash: chimera up dies, its heads do not.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(
        orphans.iter().all(|p| alive(*p)),
        "the heads outlive the crash"
    );
    assert!(
        UpFile::read(&state).is_ok(),
        "the crash left its state file"
    );

    let mut second = Up {
        child: start_up(&state, &modules, &vhost, port, free_ports(1)),
        state: state.clone(),
    };
    let pids = eventually("the second up serves", Duration::from_secs(60), query_ready).await;
    assert!(
        orphans.iter().all(|p| !alive(*p)),
        "the second up stopped what the first left behind"
    );
    assert!(pids.iter().all(|p| !orphans.contains(p)));
    Command::new("kill")
        .args(["-TERM", &second.child.id().to_string()])
        .status()
        .unwrap();
    let status = second.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(pids.iter().all(|p| !alive(*p)), "nothing left behind");
    std::fs::remove_dir_all(&state).ok();
    std::fs::remove_dir_all(&modules).ok();
}

#[tokio::test]
async fn a_commands_trace_reaches_every_subscribers_handling_over_otlp() {
    use chimera_sdk::envelope::TraceParent;
    use chimera_testenv::otelcol::{Collector, ReceivedSpan};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let collector = Collector::start();
    let vhost = TestVhost::create("up-traces");
    let state = std::env::temp_dir().join(unique_name("chimera-up-traces"));
    let modules = state.with_extension("modules");
    copy_examples(&modules, &["users", "gigs", "orders"]);
    let port = free_port();
    let mut command = up_command(&state, &modules, &vhost, port, free_ports(3));
    // As a user turns tracing on: the standard variables, passed on to every head.
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200");
    let mut up = Up {
        child: command.spawn().unwrap(),
        state: state.clone(),
    };
    let dashboard = format!("http://127.0.0.1:{port}");
    eventually(
        "every query head ready",
        Duration::from_secs(60),
        || async {
            let s = snapshot(&dashboard).await?;
            let ready = s
                .modules
                .iter()
                .flat_map(|m| m.heads.iter().filter(|h| h.head == "query"))
                .filter(|h| h.ready >= 1)
                .count();
            (ready == 3).then_some(())
        },
    )
    .await;

    // A command sent from a span of the test's own trace.
    let root = TraceParent::new_root();
    let connection = chimera_sdk::broker::connect(&vhost.amqp_url, "traces-test")
        .await
        .unwrap();
    let publisher = chimera_sdk::broker::Publisher::open(&connection)
        .await
        .unwrap();
    let mut register = common::node::register_user(&unique_name("traced"));
    register.trace = Some(root);
    publisher.publish(&register, true).await.unwrap();

    let trace = format!("{:032x}", root.trace_id);
    let in_trace = |spans: &[ReceivedSpan], service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.trace_id == trace && s.service == service && s.name == name)
            .cloned()
    };
    let (handled, subscribers) = eventually(
        "the command's and its event's handlings in the collector",
        Duration::from_secs(90),
        || async {
            let spans = collector.spans();
            let handled = in_trace(&spans, "users-worker", "handle user.register")?;
            let subscribers: Vec<ReceivedSpan> = ["gigs-worker", "orders-worker"]
                .iter()
                .map(|service| in_trace(&spans, service, "handle user.registered"))
                .collect::<Option<_>>()?;
            Some((handled, subscribers))
        },
    )
    .await;
    // One trace: the test's span → the users worker's handling → each subscriber's handling.
    assert_eq!(
        handled.parent_id,
        format!("{:016x}", root.span_id),
        "{handled:?}"
    );
    assert_eq!(handled.kind, "Consumer");
    assert_eq!(handled.attribute("messaging.system"), Some("rabbitmq"));
    assert_eq!(
        handled.attribute("messaging.destination.name"),
        Some("chimera.users.worker")
    );
    assert_eq!(
        handled.attribute("messaging.message.type"),
        Some("user.register")
    );
    for subscriber in &subscribers {
        assert_eq!(
            subscriber.parent_id, handled.span_id,
            "{} is a child of the users worker's handling: {subscriber:?}",
            subscriber.service
        );
        assert_eq!(subscriber.kind, "Consumer");
    }
    connection.close(200, "done".into()).await.ok();

    stop_cleanly(&mut up, &modules);
}

/// A terminal's Ctrl-C signals the foreground process group: under `chimera up` that must stop
/// each head with SIGTERM only (the contract's one stop signal), not also hand it the SIGINT,
/// which killed a head that handles only SIGTERM before it drained. The head here is a shell
/// script (any executable is a program) that writes down the signals it gets and what the
/// contract told it.
#[tokio::test]
async fn a_ctrl_c_stops_the_heads_with_sigterm_alone() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    let vhost = TestVhost::create("up-ctrl-c");
    let state = std::env::temp_dir().join(unique_name("chimera-up-ctrl-c"));
    let (modules, bin) = (state.with_extension("modules"), state.with_extension("bin"));
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let signals = state.with_extension("signals");
    let program = bin.join("sigterm-only");
    std::fs::write(
        &program,
        "#!/bin/sh\n\
         trap 'echo INT >> \"$SIGNALS\"' INT\n\
         trap 'echo TERM >> \"$SIGNALS\"; exit 0' TERM\n\
         echo \"started drain=$CHIMERA_DRAIN_SECONDS\" >> \"$SIGNALS\"\n\
         while true; do sleep 0.1; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        modules.join("signals.yaml"),
        format!(
            "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {{name: signals}}\n\
             spec:\n  image: sigterm-only:1\n  env: [{{name: SIGNALS, value: {}}}]\n\
             \x20 query: {{replicas: {{min: 1, max: 1}}, terminationGracePeriodSeconds: 7}}\n",
            signals.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut up_cmd = up_command(&state, &modules, &vhost, port, free_ports(1));
    up_cmd.arg("--bin-dir").arg(&bin);
    // Started as a non-interactive shell starts a background job: with SIGINT ignored (which
    // `chimera up` must undo, and early: a Ctrl-C during its start-up was lost), in a process
    // group of its own, which the Ctrl-C below signals.
    let mut command = Command::new("sh");
    command
        .args(["-c", "trap '' INT; exec \"$@\"", "sh"])
        .arg(up_cmd.get_program())
        .args(up_cmd.get_args())
        .envs(up_cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut up = Up {
        child: command.spawn().unwrap(),
        state: state.clone(),
    };
    let read = || std::fs::read_to_string(&signals).unwrap_or_default();
    eventually("the head starts", Duration::from_secs(60), || async {
        read().contains("started").then_some(())
    })
    .await;
    assert!(read().contains("started drain=7"), "{}", read());
    // Ctrl-C: SIGINT to the whole foreground group.
    let group = format!("-{}", up.child.id());
    Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "chimera up did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = read();
    assert!(
        got.contains("TERM"),
        "the head was not stopped with SIGTERM: {got}"
    );
    assert!(
        !got.contains("INT"),
        "the head got the terminal's SIGINT: {got}"
    );
    for dir in [&state, &modules, &bin] {
        std::fs::remove_dir_all(dir).ok();
    }
    std::fs::remove_file(&signals).ok();
}

/// The Python module under `chimera up` beside a Rust one, as scripts/up runs it (its program
/// found with a second `--bin-dir`): a user registered through the users module becomes the
/// buyer a notification names when an order's event arrives; then a clean stop.
#[tokio::test]
async fn the_python_module_runs_beside_the_rust_ones() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let python = repo("modules/notifications");
    assert!(
        python.join(".venv/bin/python").exists(),
        "the notifications module's virtualenv is missing: run modules/notifications/install (scripts/test does)"
    );
    assert!(
        bin_dir().join("users").is_file(),
        "the module program users is not built: run `cargo build -p chimera-users`"
    );
    let vhost = TestVhost::create("up-python");
    let state = std::env::temp_dir().join(unique_name("chimera-up-python"));
    let modules = state.with_extension("modules");
    copy_examples(&modules, &["users", "notifications"]);
    let port = free_port();
    let dashboard = format!("http://127.0.0.1:{port}");
    let mut command = up_command(&state, &modules, &vhost, port, free_ports(2));
    command.arg("--bin-dir").arg(&python);
    let mut up = Up {
        child: command.spawn().unwrap(),
        state: state.clone(),
    };
    let url = eventually("both modules serve", Duration::from_secs(90), || async {
        let s = snapshot(&dashboard).await?;
        let ready = |domain: &str| {
            s.modules
                .iter()
                .find(|m| m.domain == domain)
                .and_then(|m| m.heads.iter().find(|h| h.head == "query"))
                .filter(|h| h.ready >= 1)
                .and_then(|h| h.url.clone())
        };
        ready("users")?;
        ready("notifications")
    })
    .await;

    let connection = chimera_sdk::broker::connect(&vhost.amqp_url, "up-python-test")
        .await
        .unwrap();
    let publisher = chimera_sdk::broker::Publisher::open(&connection)
        .await
        .unwrap();
    let buyer = unique_name("buyer");
    let send = |exchange: &str, kind: &str, data: serde_json::Value| {
        chimera_sdk::broker::Outgoing::new(
            exchange,
            chimera_sdk::envelope::Envelope::new(kind, data),
        )
    };
    publisher
        .publish(
            &send(
                "chimera.users.commands",
                "user.register",
                serde_json::json!({"user_id": buyer, "name": "Grace", "email": "grace@example.com"}),
            ),
            true,
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let notifications = |user: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let body: serde_json::Value = http
                .get(format!("{url}/notifications?user_id={user}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            body["items"].as_array().cloned()
        }
    };
    // The order's event once users' event has reached the notifications worker (the queue
    // keeps their order): republished until the notification names the buyer.
    let items = eventually(
        "a notification naming the buyer",
        Duration::from_secs(60),
        || async {
            let placed = send(
                "chimera.orders.events",
                "order.placed",
                serde_json::json!({"order_id": "o-up", "buyer_id": buyer}),
            );
            publisher.publish(&placed, true).await.ok()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let items = notifications(buyer.clone()).await?;
            items
                .iter()
                .any(|i| i["text"].as_str().is_some_and(|t| t.starts_with("Grace: ")))
                .then_some(items)
        },
    )
    .await;
    assert!(items.iter().all(|i| i["order_id"] == "o-up"), "{items:?}");
    connection.close(200, "done".into()).await.ok();

    stop_cleanly(&mut up, &modules);
}
