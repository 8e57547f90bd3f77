//! `chimera publish`: one command or event in the contract's envelope, confirmed by the broker.

use std::process::ExitCode;

use anyhow::Context as _;
use chimera_broker::{Outgoing, Publisher, connect};
use chimera_contract::envelope::{Envelope, TraceParent};
use chimera_contract::names;

/// `chimera publish`
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The domain whose commands (or events) exchange receives it.
    #[arg(long)]
    pub domain: String,
    /// The command or event name (also the routing key).
    #[arg(long = "type")]
    pub kind: String,
    /// The payload, a JSON object.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// Message id (a UUID; default: a new one). Reuse one to test idempotency.
    #[arg(long)]
    pub id: Option<String>,
    /// Publish on the domain's events exchange instead of its commands exchange.
    #[arg(long)]
    pub event: bool,
    /// AMQP URL with the vhost.
    #[arg(long = "amqp", env = "CHIMERA_AMQP_URL")]
    pub amqp: String,
}

/// Publishes and waits for the broker's confirm.
pub async fn run(args: &PublishArgs) -> anyhow::Result<ExitCode> {
    let data: serde_json::Value = serde_json::from_str(&args.data).context("--data is not JSON")?;
    anyhow::ensure!(data.is_object(), "--data must be a JSON object, got {data}");
    let mut envelope = Envelope::new(&args.kind, data);
    if let Some(id) = &args.id {
        envelope.id = id
            .parse()
            .with_context(|| format!("--id {id:?} is not a UUID"))?;
    }
    let exchange = if args.event {
        names::events_exchange(&args.domain)
    } else {
        names::commands_exchange(&args.domain)
    };
    let mut message = Outgoing::new(exchange.clone(), envelope);
    message.trace = Some(TraceParent::new_root());
    let connection = connect(&args.amqp, "chimera-publish").await?;
    let outcome = async {
        let publisher = Publisher::open(&connection).await?;
        publisher.publish(&message, true).await
    }
    .await;
    let _ = connection.close(200, "published".into()).await;
    outcome?;
    println!(
        "published {} (id {}) on {exchange}; confirmed by the broker",
        args.kind, message.envelope.id
    );
    Ok(ExitCode::SUCCESS)
}
