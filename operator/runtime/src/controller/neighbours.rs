//! Neighbour triggers: the module watch passes through here on its way to the controller;
//! each event updates the neighbour index, and the modules whose plan a change alters are
//! requeued (a status write alters nobody's plan and requeues nobody).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};

use crate::caches::Events;
use chimera_core::api::ChimeraModule;
use chimera_core::topology::neighbours::{ModuleRef, Neighbours};

/// Splits the module events into the controller's trigger stream and the stream of
/// neighbours to requeue.
pub fn triggers(
    events: Events<ChimeraModule>,
    index: Arc<Mutex<Neighbours>>,
) -> (
    impl Stream<Item = Result<ChimeraModule, watcher::Error>> + Send + 'static,
    impl Stream<Item = ObjectRef<ChimeraModule>> + Send + 'static,
) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<ModuleRef>();
    // Names seen since the last relist began: what was not seen again is gone.
    let mut relisted: Option<HashSet<ModuleRef>> = None;
    let modules = events
        .inspect(move |event| {
            let Ok(event) = event else { return };
            let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
            let affected = match event {
                Event::Init => {
                    relisted = Some(HashSet::new());
                    Vec::new()
                }
                Event::InitApply(m) => {
                    if let (Some(seen), Some(key)) = (relisted.as_mut(), key(m)) {
                        seen.insert(key);
                    }
                    index.observe(m)
                }
                Event::InitDone => match relisted.take() {
                    Some(seen) => index
                        .known()
                        .into_iter()
                        .filter(|k| !seen.contains(k))
                        .flat_map(|(ns, name)| index.forget(&ns, &name))
                        .collect(),
                    None => Vec::new(),
                },
                Event::Apply(m) => index.observe(m),
                Event::Delete(m) => match key(m) {
                    Some((ns, name)) => index.forget(&ns, &name),
                    None => Vec::new(),
                },
            };
            for neighbour in affected {
                let _ = tx.unbounded_send(neighbour);
            }
        })
        .touched_objects();
    let neighbours = rx.map(|(ns, name)| ObjectRef::new(&name).within(&ns));
    (modules, neighbours)
}

fn key(module: &ChimeraModule) -> Option<ModuleRef> {
    Some((
        module.metadata.namespace.clone()?,
        module.metadata.name.clone()?,
    ))
}
