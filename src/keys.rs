//! The in-process map key of an entity and resource, `{entity}#{resource}` (ids cannot
//! contain `#`, so no two pairs share a key).

use std::cell::RefCell;

/// The key, allocated (for inserting).
pub(crate) fn entity_resource(entity_id: &str, resource: &str) -> String {
    let mut key = String::with_capacity(entity_id.len() + resource.len() + 1);
    push(&mut key, entity_id, resource);
    key
}

fn push(key: &mut String, entity_id: &str, resource: &str) {
    key.push_str(entity_id);
    key.push('#');
    key.push_str(resource);
}

thread_local! {
    static BUFFER: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f` with the key built in a reused per-thread buffer, so a lookup allocates
/// nothing.
pub(crate) fn with_entity_resource<T>(
    entity_id: &str,
    resource: &str,
    f: impl FnOnce(&str) -> T,
) -> T {
    BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut key) => {
            key.clear();
            push(&mut key, entity_id, resource);
            f(&key)
        }
        // Re-entered from inside `f`: fall back to a fresh key.
        Err(_) => f(&entity_resource(entity_id, resource)),
    })
}
