//! The topology as an AsyncAPI 3.0 document: what a module in any language (or a tool) needs to
//! talk to the others without reading their YAML.
//!
//! - a **channel** per message and the exchange it travels on: address = the routing key (the
//!   message type), with the AMQP binding naming the exchange (`chimera.<domain>.commands`,
//!   direct, or `.events`, topic; durable);
//! - **operations** per module: `receive` for each command it accepts and each published event its
//!   subscriptions match, `send` for each event it publishes;
//! - a **message** per type: the envelope (id, type, occurred_at, data) with the module's payload
//!   schema as `data` (`spec.schemas`; any JSON when it has none), the contract's headers, and the
//!   AMQP message binding.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::api::ChimeraModule;
use crate::topology::pattern::topic_matches;
use chimera_contract::names;

/// The AsyncAPI version of the document.
pub const ASYNCAPI_VERSION: &str = "3.0.0";
/// The version of the AMQP bindings used.
const AMQP_BINDING_VERSION: &str = "0.3.0";

/// A message of the topology: its type, the domain that owns it, and whether it is a command.
struct Message<'a> {
    kind: &'a str,
    owner: &'a ChimeraModule,
    command: bool,
}

impl Message<'_> {
    fn exchange(&self) -> String {
        let domain = self.owner.domain();
        if self.command {
            names::commands_exchange(domain)
        } else {
            names::events_exchange(domain)
        }
    }

    /// The channel id: `<domain>.commands.<type>` or `<domain>.events.<type>`.
    fn channel(&self) -> String {
        let side = if self.command { "commands" } else { "events" };
        format!("{}.{side}.{}", self.owner.domain(), self.kind)
    }

    /// The message id in `components.messages` (a message type may exist in several domains).
    fn id(&self) -> String {
        format!("{}.{}", self.owner.domain(), self.kind)
    }
}

/// The AsyncAPI 3.0 document of `modules`.
pub fn asyncapi(modules: &[ChimeraModule]) -> Value {
    let mut modules: Vec<&ChimeraModule> = modules.iter().collect();
    modules.sort_by(|a, b| a.domain().cmp(b.domain()));
    let mut messages = Vec::new();
    for m in &modules {
        for kind in &m.spec.commands {
            messages.push(Message {
                kind,
                owner: m,
                command: true,
            });
        }
        for kind in &m.spec.events.publishes {
            messages.push(Message {
                kind,
                owner: m,
                command: false,
            });
        }
    }
    let mut channels = Map::new();
    let mut components = Map::new();
    for message in &messages {
        components.insert(message.id(), message_component(message));
        channels.insert(message.channel(), channel(message));
    }
    let mut operations = Map::new();
    for m in &modules {
        let name = m.metadata.name.clone().unwrap_or_default();
        for message in &messages {
            let receives = if message.command {
                std::ptr::eq(message.owner, *m)
            } else {
                m.spec.events.subscribes.iter().any(|s| {
                    s.from == message.owner.domain()
                        && s.events.iter().any(|p| topic_matches(p, message.kind))
                })
            };
            let sends = !message.command && std::ptr::eq(message.owner, *m);
            for (action, yes) in [("receive", receives), ("send", sends)] {
                if yes {
                    operations.insert(
                        format!("{name}.{action}.{}", message.channel()),
                        operation(&name, action, message),
                    );
                }
            }
        }
    }
    json!({
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Chimera topology",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "The commands and events of {} Chimera module(s) on RabbitMQ, with their payload schemas and the head contract's envelope and headers (docs/contract.md).",
                modules.len()
            ),
        },
        "defaultContentType": chimera_contract::envelope::CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": components},
    })
}

fn channel(message: &Message<'_>) -> Value {
    let id = message.id();
    json!({
        "address": message.kind,
        "title": format!("{} on {}", message.kind, message.exchange()),
        "messages": {id.clone(): {"$ref": format!("#/components/messages/{id}")}},
        "bindings": {"amqp": {
            "is": "routingKey",
            "exchange": {
                "name": message.exchange(),
                // As the planner declares them: commands direct, events topic.
                "type": if message.command { "direct" } else { "topic" },
                "durable": true,
                "autoDelete": false,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }},
    })
}

fn operation(module: &str, action: &str, message: &Message<'_>) -> Value {
    let channel = message.channel();
    let what = match (action, message.command) {
        ("send", _) => format!("{module} publishes {}", message.kind),
        (_, true) => format!("{module} handles the command {}", message.kind),
        _ => format!("{module} consumes {} from its worker queue", message.kind),
    };
    let mut op = json!({
        "action": action,
        "title": what,
        "channel": {"$ref": format!("#/channels/{}", escape(&channel))},
        "messages": [{"$ref": format!("#/channels/{}/messages/{}", escape(&channel), escape(&message.id()))}],
    });
    if action == "receive" {
        op["bindings"] = json!({"amqp": {"ack": true, "bindingVersion": AMQP_BINDING_VERSION}});
    }
    op
}

/// A JSON Pointer token (`~` and `/` escaped).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn message_component(message: &Message<'_>) -> Value {
    let data = message
        .owner
        .spec
        .schemas
        .get(message.kind)
        .cloned()
        .unwrap_or_else(|| json!({"description": "no schema declared: any JSON"}));
    let kind = if message.command { "command" } else { "event" };
    json!({
        "name": message.kind,
        "title": format!("{} ({kind} of {})", message.kind, message.owner.domain()),
        "contentType": chimera_contract::envelope::CONTENT_TYPE,
        "headers": headers(),
        "payload": {
            "type": "object",
            "required": ["id", "type", "occurred_at", "data"],
            "properties": {
                "id": {"type": "string", "format": "uuid", "description": "the message's identity: duplicates are dropped by it"},
                "type": {"type": "string", "const": message.kind},
                "occurred_at": {"type": "string", "format": "date-time"},
                "data": data,
            },
        },
        "bindings": {"amqp": {
            "contentEncoding": "utf-8",
            "messageType": message.kind,
            "bindingVersion": AMQP_BINDING_VERSION,
        }},
    })
}

/// The contract's headers (docs/contract.md, section 6).
fn headers() -> Value {
    use chimera_contract::envelope::{ATTEMPT, ORIGINAL_ROUTING_KEY, REASON, TRACEPARENT};
    let mut properties = BTreeMap::new();
    properties.insert(
        TRACEPARENT,
        json!({"type": "string", "description": "W3C trace context of the sender's span"}),
    );
    properties.insert(
        ATTEMPT,
        json!({"type": "integer", "minimum": 1, "description": "delivery attempt, 1 on the first"}),
    );
    properties.insert(
        REASON,
        json!({"type": "string", "description": "on retries and dead letters: why"}),
    );
    properties.insert(ORIGINAL_ROUTING_KEY, json!({"type": "string", "description": "on retries and dead letters: the routing key it was first published with"}));
    json!({"type": "object", "properties": properties})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validation::modules_from_yaml;

    const YAML: &str = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: users}\nspec:\n  image: x\n  commands: [user.register]\n  events: {publishes: [user.registered]}\n  worker: {}\n  schemas:\n    user.register: {type: object, required: [user_id]}\n---\napiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: orders}\nspec:\n  image: x\n  events: {publishes: [order.placed], subscribes: [{from: users, events: [\"user.*\"]}]}\n  worker: {}\n";

    fn doc() -> Value {
        let (modules, problems) = modules_from_yaml(YAML);
        assert!(problems.is_empty(), "{problems:?}");
        asyncapi(&modules)
    }

    #[test]
    fn every_message_has_its_channel_on_its_exchange() {
        let d = doc();
        assert_eq!(d["asyncapi"], "3.0.0");
        let channels = d["channels"]
            .as_object()
            .map(|c| c.keys().cloned().collect::<Vec<_>>());
        assert_eq!(
            channels,
            Some(vec![
                "orders.events.order.placed".to_owned(),
                "users.commands.user.register".to_owned(),
                "users.events.user.registered".to_owned(),
            ])
        );
        let c = &d["channels"]["users.commands.user.register"];
        assert_eq!(c["address"], "user.register");
        assert_eq!(
            c["bindings"]["amqp"]["exchange"]["name"],
            "chimera.users.commands"
        );
    }

    #[test]
    fn operations_say_who_sends_and_who_receives() {
        let d = doc();
        let ops = d["operations"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(
            ops,
            Some(vec![
                "orders.receive.users.events.user.registered".to_owned(),
                "orders.send.orders.events.order.placed".to_owned(),
                "users.receive.users.commands.user.register".to_owned(),
                "users.send.users.events.user.registered".to_owned(),
            ])
        );
        let op = &d["operations"]["orders.receive.users.events.user.registered"];
        assert_eq!(op["action"], "receive");
        assert_eq!(
            op["channel"]["$ref"],
            "#/channels/users.events.user.registered"
        );
    }

    #[test]
    fn messages_carry_the_envelope_with_the_payload_schema() {
        let d = doc();
        let m = &d["components"]["messages"]["users.user.register"];
        assert_eq!(m["payload"]["properties"]["type"]["const"], "user.register");
        assert_eq!(m["payload"]["properties"]["data"]["required"][0], "user_id");
        assert!(m["headers"]["properties"]["traceparent"].is_object());
        // Without a schema, data is any JSON.
        let e = &d["components"]["messages"]["orders.order.placed"];
        assert!(e["payload"]["properties"]["data"]["description"].is_string());
    }
}
