//! A module user's side on the broker, through the management API: the vhost's permissions as
//! listed (one read per vhost serves every module's check), and the steps that set them.

use std::collections::HashMap;

use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

use crate::topology::management::{BrokerError, ManagementClient};
use chimera_core::access::user::USER_TAG;
use chimera_core::access::{Grants, Step, TopicGrant};
use chimera_core::topology::state::percent_encode;

#[derive(Deserialize)]
struct Permission {
    user: String,
    configure: String,
    write: String,
    read: String,
}

#[derive(Deserialize)]
struct TopicPermission {
    user: String,
    exchange: String,
    write: String,
    read: String,
}

/// Every user's permissions on the client's vhost, topic permissions included.
pub async fn vhost_grants(
    client: &ManagementClient,
) -> Result<HashMap<String, Grants>, BrokerError> {
    let vhost = percent_encode(client.vhost());
    let permissions: Vec<Permission> =
        read_json(client, &format!("/api/vhosts/{vhost}/permissions")).await?;
    let topics: Vec<TopicPermission> =
        read_json(client, &format!("/api/vhosts/{vhost}/topic-permissions")).await?;
    let mut grants: HashMap<String, Grants> = permissions
        .into_iter()
        .map(|p| {
            let g = Grants {
                configure: p.configure,
                write: p.write,
                read: p.read,
                topics: Vec::new(),
            };
            (p.user, g)
        })
        .collect();
    for t in topics {
        // A topic permission without vhost permissions grants nothing; it still counts as
        // stale for the user that has it.
        let entry = grants.entry(t.user).or_insert_with(|| Grants {
            configure: String::new(),
            write: String::new(),
            read: String::new(),
            topics: Vec::new(),
        });
        entry.topics.push(TopicGrant {
            exchange: t.exchange,
            write: t.write,
            read: t.read,
        });
    }
    for g in grants.values_mut() {
        g.topics.sort();
    }
    Ok(grants)
}

/// Whether the user exists, and if so whether the operator made it (it carries the tag).
pub async fn user_owner(
    client: &ManagementClient,
    user: &str,
) -> Result<Option<bool>, BrokerError> {
    #[derive(Deserialize)]
    struct User {
        // A list in RabbitMQ 3.9 and later, a comma-separated string before.
        tags: serde_json::Value,
    }
    let path = format!("/api/users/{}", percent_encode(user));
    let response = client.request(Method::GET, &path, None).await?;
    if response.status().as_u16() == 404 {
        return Ok(None);
    }
    let found: User = parse(client, &path, response).await?;
    let tagged = match &found.tags {
        serde_json::Value::Array(tags) => tags.iter().any(|t| t.as_str() == Some(USER_TAG)),
        serde_json::Value::String(tags) => tags.split(',').any(|t| t.trim() == USER_TAG),
        _ => false,
    };
    Ok(Some(tagged))
}

/// Applies the steps that give `user` (with `password`) the grants `want`, in order.
pub async fn apply(
    client: &ManagementClient,
    user: &str,
    password: &str,
    want: &Grants,
    steps: &[Step],
) -> Result<(), BrokerError> {
    let vhost = percent_encode(client.vhost());
    let name = percent_encode(user);
    for step in steps {
        match step {
            Step::PutUser => {
                if user_owner(client, user).await? == Some(false) {
                    return Err(BrokerError::UserTaken {
                        user: user.to_owned(),
                        tag: USER_TAG,
                    });
                }
                let body = json!({"password": password, "tags": USER_TAG});
                send(
                    client,
                    Method::PUT,
                    &format!("/api/users/{name}"),
                    Some(&body),
                )
                .await?;
            }
            Step::PutPermissions => {
                let body =
                    json!({"configure": want.configure, "write": want.write, "read": want.read});
                send(
                    client,
                    Method::PUT,
                    &format!("/api/permissions/{vhost}/{name}"),
                    Some(&body),
                )
                .await?;
            }
            Step::ClearTopics => {
                send(
                    client,
                    Method::DELETE,
                    &format!("/api/topic-permissions/{vhost}/{name}"),
                    None,
                )
                .await?;
            }
            Step::PutTopic(topic) => {
                let body =
                    json!({"exchange": topic.exchange, "write": topic.write, "read": topic.read});
                send(
                    client,
                    Method::PUT,
                    &format!("/api/topic-permissions/{vhost}/{name}"),
                    Some(&body),
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// Deletes the user if the operator made it; a user already gone, or someone else's, is left
/// alone. Returns whether it deleted one.
pub async fn delete_user(client: &ManagementClient, user: &str) -> Result<bool, BrokerError> {
    if user_owner(client, user).await? != Some(true) {
        return Ok(false);
    }
    let path = format!("/api/users/{}", percent_encode(user));
    let response = client.request(Method::DELETE, &path, None).await?;
    if response.status().as_u16() == 404 {
        return Ok(false);
    }
    check(client, &path, response).await.map(|_| true)
}

async fn send(
    client: &ManagementClient,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(), BrokerError> {
    let response = client.request(method.clone(), path, body).await?;
    // Clearing what is already clear is done.
    if method == Method::DELETE && response.status().as_u16() == 404 {
        return Ok(());
    }
    check(client, path, response).await.map(|_| ())
}

async fn read_json<T: serde::de::DeserializeOwned>(
    client: &ManagementClient,
    path: &str,
) -> Result<T, BrokerError> {
    let response = client.request(Method::GET, path, None).await?;
    if response.status().as_u16() == 404 {
        return Err(BrokerError::VhostNotFound {
            vhost: client.vhost().to_owned(),
        });
    }
    parse(client, path, response).await
}

async fn parse<T: serde::de::DeserializeOwned>(
    client: &ManagementClient,
    path: &str,
    response: reqwest::Response,
) -> Result<T, BrokerError> {
    check(client, path, response)
        .await?
        .json()
        .await
        .map_err(|cause| BrokerError::ManagementUnreachable {
            url: path.to_owned(),
            cause,
        })
}

/// The response when its status is a success; the error saying why otherwise.
async fn check(
    client: &ManagementClient,
    path: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, BrokerError> {
    let status = response.status().as_u16();
    match status {
        200..=299 => Ok(response),
        401 => Err(BrokerError::ManagementUnauthorized {
            user: client.user().to_owned(),
        }),
        403 => Err(BrokerError::ManagementForbidden {
            user: client.user().to_owned(),
            path: path.to_owned(),
        }),
        _ => {
            let body = response.text().await.unwrap_or_default();
            Err(BrokerError::ManagementStatus {
                path: path.to_owned(),
                status,
                body: body.chars().take(300).collect(),
            })
        }
    }
}
