//! What the clauses of `chimera conformance` act through: the module's heads as processes, an
//! admin connection that sends messages and taps what the worker publishes (a copy of every
//! event, retry and dead letter, on queues of the harness's own), the heads' HTTP endpoints,
//! and the module's SQLite database.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

use crate::local::process::{Replica, ReplicaSpec};
use chimera_broker::{Outgoing, Publisher};
use chimera_contract::envelope::Envelope;
use chimera_contract::{Head, names};
use chimera_core::api::ChimeraModule;
use chimera_core::conformance::metrics::Exposition;
use chimera_core::local::plan::{LocalContext, head_args, replica_env};
use chimera_core::topology::pattern::topic_matches;

/// One message a tap caught.
#[derive(Clone, Debug)]
pub struct Caught {
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its body.
    pub body: Vec<u8>,
    /// Its properties.
    pub properties: BasicProperties,
}

impl Caught {
    /// A text (or integer) header, as text.
    pub fn header(&self, key: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(key)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            AMQPValue::ShortInt(n) => Some(n.to_string()),
            AMQPValue::LongUInt(n) => Some(n.to_string()),
            AMQPValue::ShortShortInt(n) => Some(n.to_string()),
            AMQPValue::ShortShortUInt(n) => Some(n.to_string()),
            AMQPValue::ShortUInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// The envelope's `id`, when the body is one.
    pub fn envelope_id(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        body.get("id")?.as_str().map(str::to_owned)
    }
}

/// A tap: a queue of the harness's own bound beside the module's, and what it caught so far.
pub struct Tap {
    queue: String,
    /// Everything caught, in order.
    pub caught: Vec<Caught>,
}

/// A running head.
pub struct RunningHead {
    /// The process.
    pub replica: Replica,
    /// Where it serves HTTP.
    pub addr: SocketAddr,
}

/// The module under test and everything around it.
pub struct Harness {
    /// The module as run (retry delays shortened).
    pub module: ChimeraModule,
    /// Its program.
    pub program: PathBuf,
    /// Where its database and logs live.
    pub dir: PathBuf,
    /// What the heads get as the broker (the restricted user's URL).
    pub local: LocalContext,
    /// The database file.
    pub db_path: PathBuf,
    /// Admin connection (the harness's own).
    pub connection: Connection,
    /// Confirming publisher on it.
    pub publisher: Publisher,
    channel: Channel,
    /// Copies of the module's events.
    pub events: Tap,
    /// Copies of its retries and dead letters (routing key = the retry queue or the dlq).
    pub failures: Tap,
    /// HTTP client for the heads.
    pub http: reqwest::Client,
    /// The heads running now.
    pub heads: BTreeMap<&'static str, RunningHead>,
    starts: u32,
}

/// An HTTP answer.
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: String,
    /// `Allow`.
    pub allow: String,
    /// Body.
    pub body: String,
}

impl Harness {
    /// Connects as admin and binds the taps.
    pub async fn new(
        module: ChimeraModule,
        program: PathBuf,
        dir: PathBuf,
        admin_amqp: &str,
        local: LocalContext,
    ) -> anyhow::Result<Self> {
        let connection = chimera_broker::connect(admin_amqp, "chimera-conformance")
            .await
            .context("connecting to the broker as its admin")?;
        let publisher = Publisher::open(&connection).await?;
        let channel = connection.create_channel().await?;
        let domain = module.domain().to_owned();
        let events = tap(
            &channel,
            &names::events_exchange(&domain),
            &["#".to_owned()],
        )
        .await?;
        let mut keys = vec![names::dead_letter_queue(&domain)];
        let delays = module
            .spec
            .worker
            .as_ref()
            .map_or(0, |w| w.retry.delays_seconds.len());
        keys.extend((1..=delays).map(|n| names::retry_queue(&domain, n)));
        let failures = if module.spec.worker.is_some() {
            tap(&channel, &names::failures_exchange(&domain), &keys).await?
        } else {
            Tap {
                queue: String::new(),
                caught: Vec::new(),
            }
        };
        let db_path = dir.join(format!("{domain}.db"));
        Ok(Self {
            module,
            program,
            dir,
            local,
            db_path,
            connection,
            publisher,
            channel,
            events,
            failures,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            heads: BTreeMap::new(),
            starts: 0,
        })
    }

    /// The domain.
    pub fn domain(&self) -> String {
        self.module.domain().to_owned()
    }

    /// The environment a head gets (the contract's, as `chimera up` resolves it).
    pub fn env(&self, head: Head, port: u16) -> anyhow::Result<Vec<(String, String)>> {
        Ok(replica_env(
            &self.module,
            head,
            1,
            port,
            &self.local,
            &|_| None,
        )?)
    }

    /// Starts `head` with `env` (from [`Self::env`], perhaps altered); its output goes to
    /// `logs/<head>-<n>.log`.
    pub async fn spawn(
        &mut self,
        head: Head,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Replica> {
        self.starts += 1;
        let spec = ReplicaSpec {
            label: format!("{}/{}", self.domain(), head.as_str()),
            program: self.program.clone(),
            args: head_args(&self.module, head),
            env,
            log_file: self
                .dir
                .join("logs")
                .join(format!("{}-{}.log", head.as_str(), self.starts)),
            echo: false,
        };
        Replica::start(spec)
            .await
            .with_context(|| format!("starting {}", self.program.display()))
    }

    /// Starts `head` with the contract's environment on a free port and waits until it is
    /// ready; the problem (with the end of its log) otherwise.
    pub async fn start(&mut self, head: Head, within: Duration) -> Result<(), String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let env = self.env(head, port).map_err(|e| format!("{e:#}"))?;
        let mut replica = self.spawn(head, env).await.map_err(|e| format!("{e:#}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = replica.exited() {
                return Err(format!(
                    "the {} head exited ({status}) before it was ready; its log ends:\n{}",
                    head.as_str(),
                    tail(&replica.spec.log_file)
                ));
            }
            if let Ok(answer) = self.get_at(addr, "/readyz").await
                && answer.status == 200
            {
                break;
            }
            if Instant::now() > deadline {
                let log = tail(&replica.spec.log_file);
                replica.stop(Duration::from_secs(5)).await;
                return Err(format!(
                    "the {} head was not ready (GET /readyz 200) within {} s; its log ends:\n{log}",
                    head.as_str(),
                    within.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.heads
            .insert(head.as_str(), RunningHead { replica, addr });
        Ok(())
    }

    /// `GET path` on a running head.
    pub async fn get(&self, head: Head, path: &str) -> anyhow::Result<Answer> {
        let addr = self.addr(head)?;
        self.get_at(addr, path).await
    }

    fn addr(&self, head: Head) -> anyhow::Result<SocketAddr> {
        self.heads
            .get(head.as_str())
            .map(|h| h.addr)
            .with_context(|| format!("the {} head is not running", head.as_str()))
    }

    async fn get_at(&self, addr: SocketAddr, path: &str) -> anyhow::Result<Answer> {
        self.request(reqwest::Method::GET, addr, path).await
    }

    /// Any method on a running head.
    pub async fn call(
        &self,
        head: Head,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<Answer> {
        let addr = self.addr(head)?;
        self.request(method, addr, path).await
    }

    async fn request(
        &self,
        method: reqwest::Method,
        addr: SocketAddr,
        path: &str,
    ) -> anyhow::Result<Answer> {
        let response = self
            .http
            .request(method.clone(), format!("http://{addr}{path}"))
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        Ok(Answer {
            status: response.status().as_u16(),
            content_type: header("content-type"),
            allow: header("allow"),
            body: response.text().await.unwrap_or_default(),
        })
    }

    /// The head's metrics, parsed.
    pub async fn scrape(&self, head: Head) -> anyhow::Result<Exposition> {
        let answer = self.get(head, "/metrics").await?;
        anyhow::ensure!(
            answer.status == 200,
            "GET /metrics answered {}",
            answer.status
        );
        Exposition::parse(&answer.body).map_err(anyhow::Error::msg)
    }

    /// The worker's count of `kind` settled as `outcome` (0 when it cannot be read).
    pub async fn count(&self, kind: &str, outcome: &str) -> f64 {
        self.scrape(Head::Worker).await.map_or(0.0, |s| {
            s.sum(
                chimera_contract::metrics::WORKER_MESSAGES,
                &[("kind", kind), ("outcome", outcome)],
            )
        })
    }

    /// Waits until the worker's count of `kind` as `outcome` reaches `at_least`.
    pub async fn wait_count(
        &self,
        kind: &str,
        outcome: &str,
        at_least: f64,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.count(kind, outcome).await >= at_least {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Where a message of `kind` enters the module: its commands exchange for a command, the
    /// publisher's events exchange for a subscribed event; `None` for anything else.
    pub fn route(&self, kind: &str) -> Option<String> {
        let spec = &self.module.spec;
        if spec.commands.iter().any(|c| c == kind) {
            return Some(names::commands_exchange(self.module.domain()));
        }
        spec.events
            .subscribes
            .iter()
            .find(|s| s.events.iter().any(|p| topic_matches(p, kind)))
            .map(|s| names::events_exchange(&s.from))
    }

    /// Sends `envelope` the way it reaches the module (its route, routing key = its type), or
    /// straight to the worker queue when it has no route; returns the routing key used.
    pub async fn send(
        &self,
        envelope: &Envelope,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let (exchange, key) = match self.route(&envelope.kind) {
            Some(exchange) => (exchange, envelope.kind.clone()),
            None => (String::new(), names::worker_queue(self.module.domain())),
        };
        let mut message = Outgoing::new(exchange, envelope.clone());
        message.routing_key = key.clone();
        message.headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.publisher.publish(&message, true).await?;
        Ok(key)
    }

    /// Sends many (pipelined confirms).
    pub async fn send_all(&self, envelopes: &[Envelope]) -> anyhow::Result<()> {
        let messages: Vec<Outgoing> = envelopes
            .iter()
            .map(|e| {
                let exchange = self.route(&e.kind).unwrap_or_default();
                let mut m = Outgoing::new(exchange.clone(), e.clone());
                if exchange.is_empty() {
                    m.routing_key = names::worker_queue(self.module.domain());
                }
                m
            })
            .collect();
        for chunk in messages.chunks(200) {
            self.publisher.publish_all(chunk, true).await?;
        }
        Ok(())
    }

    /// Sends raw bytes straight to the worker queue.
    pub async fn send_raw(&self, body: &[u8], properties: &BasicProperties) -> anyhow::Result<()> {
        self.publisher
            .publish_raw(
                "",
                &names::worker_queue(self.module.domain()),
                body,
                properties,
                &[],
            )
            .await?;
        Ok(())
    }

    /// Reads what the taps caught since the last call into [`Tap::caught`].
    pub async fn collect(&mut self) -> anyhow::Result<()> {
        for tap in [&mut self.events, &mut self.failures] {
            if tap.queue.is_empty() {
                continue;
            }
            while let Some(message) = self
                .channel
                .basic_get(tap.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await?
            {
                let d = message.delivery;
                tap.caught.push(Caught {
                    routing_key: d.routing_key.to_string(),
                    body: d.data,
                    properties: d.properties,
                });
            }
        }
        Ok(())
    }

    /// Waits until the failures tap holds a message that `pred` accepts; returns it.
    pub async fn wait_failure(
        &mut self,
        within: Duration,
        pred: impl Fn(&Caught) -> bool,
    ) -> anyhow::Result<Option<Caught>> {
        let deadline = Instant::now() + within;
        loop {
            self.collect().await?;
            if let Some(found) = self.failures.caught.iter().find(|c| pred(c)) {
                return Ok(Some(found.clone()));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the failures tap holds the message `id` (published with `routing_key`, if
    /// given): a retry or a dead letter of it.
    pub async fn caught(
        &mut self,
        within: Duration,
        id: &str,
        routing_key: Option<&str>,
    ) -> Option<Caught> {
        self.wait_failure(within, |c| {
            c.envelope_id().as_deref() == Some(id) && routing_key.is_none_or(|k| c.routing_key == k)
        })
        .await
        .ok()
        .flatten()
    }

    /// Stops every head (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop_all(&mut self) {
        let heads = std::mem::take(&mut self.heads);
        for (_, head) in heads {
            head.replica.stop(Duration::from_secs(10)).await;
        }
    }

    /// Every head's output so far.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) {
            for entry in entries.flatten() {
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        out
    }
}

async fn tap(channel: &Channel, exchange: &str, keys: &[String]) -> anyhow::Result<Tap> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring a tap queue")?;
    let name = queue.name().to_string();
    for key in keys {
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding a tap to {exchange}"))?;
    }
    Ok(Tap {
        queue: name,
        caught: Vec::new(),
    })
}

/// A port nothing listens on now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The last lines of a log file.
pub fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
