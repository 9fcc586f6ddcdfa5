//! Validation of identifiers and names.
//!
//! Every public entry point checks its input here before anything reaches a backend, so no
//! value can contain `#` (the key separator of the DynamoDB layout) or forge another key.
//!
//! | what | rule |
//! |---|---|
//! | entity id, parent id | 1 to 256 characters; starts alphanumeric; then alphanumerics and `_ . - : @` |
//! | limit name | 1 to 64; starts with a letter; then alphanumerics and `_ . -`; not `wcu` |
//! | resource | like a limit name plus `/` (e.g. `openai/gpt-4`); `wcu` allowed |
//! | namespace | like a limit name |

use crate::{Error, Field};

/// The pseudo-resource of entity limits that apply to every resource.
pub const DEFAULT_RESOURCE: &str = "_default_";

/// A limit name reserved by the DynamoDB layout (write-capacity tracking).
pub const RESERVED_LIMIT_NAME: &str = "wcu";

const MAX_ID_LEN: usize = 256;
const MAX_NAME_LEN: usize = 64;

fn check(
    value: &str,
    max_len: usize,
    first_ok: impl Fn(char) -> bool,
    first_rule: &str,
    rest_ok: impl Fn(char) -> bool,
    rest_rule: &str,
) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    // Every allowed character is ASCII, so the common valid case is a single byte scan.
    let bytes = value.as_bytes();
    if bytes.len() <= max_len
        && first_ok(char::from(bytes[0]))
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii() && rest_ok(char::from(*b)))
    {
        return Ok(());
    }
    if value.chars().count() > max_len {
        return Err(format!("must be at most {max_len} characters"));
    }
    if value.contains('#') {
        return Err("must not contain '#'".into());
    }
    let mut chars = value.chars();
    if !chars.next().is_some_and(&first_ok) {
        return Err(format!("must start with {first_rule}"));
    }
    if let Some(bad) = chars.find(|c| !rest_ok(*c)) {
        return Err(format!("contains {bad:?}; allowed: {rest_rule}"));
    }
    Ok(())
}

/// The common valid case, in one byte scan inlined at the caller (every allowed
/// character is ASCII, so a non-ASCII byte fails too); the explanation of a failure is
/// built by the cold path.
#[inline(always)]
fn plainly_valid(
    value: &str,
    max_len: usize,
    first_ok: impl Fn(u8) -> bool,
    rest_ok: impl Fn(u8) -> bool,
) -> bool {
    match value.as_bytes().split_first() {
        Some((first, rest)) => {
            value.len() <= max_len && first_ok(*first) && rest.iter().all(|b| rest_ok(*b))
        }
        None => false,
    }
}

/// Validates an entity id (also used for parent ids); `field` names it in the error.
#[inline]
pub fn validate_identifier(field: Field, value: &str) -> Result<(), Error> {
    if plainly_valid(
        value,
        MAX_ID_LEN,
        |b| b.is_ascii_alphanumeric(),
        |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':' | b'@'),
    ) {
        return Ok(());
    }
    invalid_identifier(field, value)
}

#[cold]
#[inline(never)]
fn invalid_identifier(field: Field, value: &str) -> Result<(), Error> {
    check(
        value,
        MAX_ID_LEN,
        |c| c.is_ascii_alphanumeric(),
        "a letter or digit",
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':' | '@'),
        "letters, digits and _ . - : @",
    )
    .map_err(|reason| Error::InvalidIdentifier {
        field,
        value: truncate(value),
        reason,
    })
}

/// Validates an entity id.
#[inline]
pub fn validate_entity_id(value: &str) -> Result<(), Error> {
    validate_identifier(Field::EntityId, value)
}

/// Validates a limit name.
pub fn validate_limit_name(value: &str) -> Result<(), Error> {
    check(
        value,
        MAX_NAME_LEN,
        |c| c.is_ascii_alphabetic(),
        "a letter",
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'),
        "letters, digits and _ . -",
    )
    .and_then(|()| {
        if value == RESERVED_LIMIT_NAME {
            Err(format!("'{RESERVED_LIMIT_NAME}' is reserved"))
        } else {
            Ok(())
        }
    })
    .map_err(|reason| Error::InvalidName {
        field: Field::LimitName,
        value: truncate(value),
        reason,
    })
}

/// Validates a resource name (`openai/gpt-4`, `api`).
#[inline]
pub fn validate_resource(value: &str) -> Result<(), Error> {
    if plainly_valid(
        value,
        MAX_NAME_LEN,
        |b| b.is_ascii_alphabetic(),
        |b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'),
    ) {
        return Ok(());
    }
    invalid_resource(value)
}

#[cold]
#[inline(never)]
fn invalid_resource(value: &str) -> Result<(), Error> {
    check(
        value,
        MAX_NAME_LEN,
        |c| c.is_ascii_alphabetic(),
        "a letter",
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'),
        "letters, digits and _ . - /",
    )
    .map_err(|reason| Error::InvalidName {
        field: Field::Resource,
        value: truncate(value),
        reason,
    })
}

/// Validates a resource for the entity-limit APIs, which also accept [`DEFAULT_RESOURCE`].
pub fn validate_entity_config_resource(value: &str) -> Result<(), Error> {
    if value == DEFAULT_RESOURCE {
        Ok(())
    } else {
        validate_resource(value)
    }
}

/// Validates a DynamoDB table name: 3 to 255 letters, digits and `_ . -` (DynamoDB's own
/// rule, checked here so a bad name fails before any call).
pub fn validate_table_name(value: &str) -> Result<(), Error> {
    let reason = if value.len() < 3 {
        Some("must be at least 3 characters".to_string())
    } else if value.len() > 255 {
        Some("must be at most 255 characters".to_string())
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
            .map(|c| format!("contains {c:?}; allowed: letters, digits and _ . -"))
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            field: Field::Table,
            value: truncate(value),
            reason,
        }),
    }
}

/// Validates a namespace name.
pub fn validate_namespace(value: &str) -> Result<(), Error> {
    check(
        value,
        MAX_NAME_LEN,
        |c| c.is_ascii_alphabetic(),
        "a letter",
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'),
        "letters, digits and _ . -",
    )
    .map_err(|reason| Error::InvalidName {
        field: Field::Namespace,
        value: truncate(value),
        reason,
    })
}

/// Error values are echoed back to clients: keep them short.
fn truncate(value: &str) -> String {
    const MAX: usize = 50;
    if value.chars().count() <= MAX {
        value.to_string()
    } else {
        let mut s: String = value.chars().take(MAX).collect();
        s.push_str("...");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in [
            "user-123",
            "550e8400-e29b-41d4-a716-446655440000",
            "sk-proj-abc_DEF.1",
            "alice@example.com",
            "a:b",
            "9",
        ] {
            assert!(validate_entity_id(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(257);
        for bad in ["", "-abc", "_x", "a#b", "a b", "a/b", long.as_str(), "é"] {
            let err = validate_entity_id(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidIdentifier { .. }), "{bad}");
        }
        assert!(validate_entity_id(&"a".repeat(256)).is_ok());
    }

    #[test]
    fn names_and_resources() {
        assert!(validate_limit_name("tpm").is_ok());
        assert!(validate_limit_name("tokens.in-v2").is_ok());
        for bad in ["", "1rpm", "wcu", "a#b", "a/b", &"a".repeat(65)] {
            assert!(validate_limit_name(bad).is_err(), "{bad}");
        }
        assert!(validate_resource("openai/gpt-4").is_ok());
        assert!(validate_resource("wcu").is_ok());
        for bad in ["", "/gpt", "a#b", "_default_", "gpt 4"] {
            assert!(validate_resource(bad).is_err(), "{bad}");
        }
        assert!(validate_entity_config_resource("_default_").is_ok());
        assert!(validate_namespace("tenant-a").is_ok());
        assert!(validate_namespace("_").is_err());
    }

    #[test]
    fn error_names_field_and_truncates_value() {
        let err = validate_entity_id(&format!("#{}", "x".repeat(100))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("entity_id"), "{text}");
        assert!(text.contains("..."), "{text}");
    }
}
