//! The module's Secret `<module>-broker`: made with a fresh password when missing, kept (and
//! its password with it) when present, refused when someone else's object has the name.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::Error;
use crate::cluster::{Context, FIELD_MANAGER};
use crate::controller::check_controller;
use chimera_core::access::user::{
    PASSWORD_KEY, PASSWORD_LEN, broker_secret, password_from, secret_name, secret_value,
    with_credentials,
};
use chimera_core::api::ChimeraModule;
use chimera_core::workloads::drift;

/// The password in the module's Secret, and whether it was just made. `base_url` is the
/// operator's AMQP URL, whose server and vhost the module's URL keeps.
pub async fn ensure(
    module: &ChimeraModule,
    ctx: &Context,
    user: &str,
    base_url: &str,
) -> Result<(String, bool), Error> {
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = secret_name(&module.name_any());
    // Read from etcd, not the watch cache: a stale miss would make a second password.
    let existing = api.get_opt(&name).await.map_err(|cause| Error::Kube {
        action: format!("read Secret {name}"),
        cause,
    })?;
    let kept = existing
        .as_ref()
        .and_then(|s| secret_value(s, PASSWORD_KEY))
        .filter(|p| !p.is_empty());
    let (password, made) = match kept {
        Some(p) => (p, false),
        None => (new_password()?, true),
    };
    let url = with_credentials(base_url, user, &password)
        .map_err(|e| Error::Broker(crate::topology::management::BrokerError::BadUrl(e)))?;
    let desired = broker_secret(module, user, &password, &url)?;
    if let Some(existing) = &existing {
        check_controller(&desired, existing, "Secret", &name)?;
        let want = serde_json::to_value(&desired).map_err(Error::Serialize)?;
        let have = serde_json::to_value(existing).map_err(Error::Serialize)?;
        if drift::first_difference(&want, &have).is_none() {
            return Ok((password, made));
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map_err(|cause| Error::Apply {
        kind: "Secret".into(),
        name,
        cause,
    })?;
    Ok((password, made))
}

fn new_password() -> Result<String, Error> {
    let mut random = [0u8; PASSWORD_LEN];
    getrandom::fill(&mut random).map_err(|e| Error::Random(e.to_string()))?;
    Ok(password_from(&random))
}
