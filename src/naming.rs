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

/// Byte classes, one bit each, looked up in [`CLASSES`]: a rule allows a byte when it
/// shares a bit with the rule's mask (one load and test per byte, whatever the rule).
const DIGIT: u8 = 1;
const LETTER: u8 = 2;
/// `_ . -`
const NAME_PUNCT: u8 = 4;
/// `: @`
const ID_PUNCT: u8 = 8;
const SLASH: u8 = 16;

/// The class of every byte (0 for a byte no rule allows: non-ASCII, `#`, spaces, ...).
const CLASSES: [u8; 256] = {
    let mut classes = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        classes[b] = if c.is_ascii_digit() {
            DIGIT
        } else if c.is_ascii_alphabetic() {
            LETTER
        } else {
            match c {
                b'_' | b'.' | b'-' => NAME_PUNCT,
                b':' | b'@' => ID_PUNCT,
                b'/' => SLASH,
                _ => 0,
            }
        };
        b += 1;
    }
    classes
};

/// One naming rule: the length bound, the byte classes that may start and follow, and how
/// to say so. Every allowed character is ASCII.
struct Rule {
    max_len: usize,
    first: u8,
    first_rule: &'static str,
    rest: u8,
    rest_rule: &'static str,
}

/// Entity and parent ids.
const IDENTIFIER: Rule = Rule {
    max_len: MAX_ID_LEN,
    first: LETTER | DIGIT,
    first_rule: "a letter or digit",
    rest: LETTER | DIGIT | NAME_PUNCT | ID_PUNCT,
    rest_rule: "letters, digits and _ . - : @",
};

/// Limit names and namespaces.
const NAME: Rule = Rule {
    max_len: MAX_NAME_LEN,
    first: LETTER,
    first_rule: "a letter",
    rest: LETTER | DIGIT | NAME_PUNCT,
    rest_rule: "letters, digits and _ . -",
};

/// Resources: a name that may contain `/`.
const RESOURCE: Rule = Rule {
    max_len: MAX_NAME_LEN,
    first: LETTER,
    first_rule: "a letter",
    rest: LETTER | DIGIT | NAME_PUNCT | SLASH,
    rest_rule: "letters, digits and _ . - /",
};

/// Whether `b` is in one of the classes of `mask`.
#[inline(always)]
fn allows(mask: u8, b: u8) -> bool {
    CLASSES[usize::from(b)] & mask != 0
}

impl Rule {
    /// `Ok`, or why `value` breaks the rule. The valid case is one byte scan, inlined at
    /// the caller (a non-ASCII byte fails it too); the explanation is built on a cold path.
    #[inline(always)]
    fn check(&self, value: &str) -> Result<(), String> {
        let accepted = match value.as_bytes().split_first() {
            Some((first, rest)) => {
                value.len() <= self.max_len
                    && allows(self.first, *first)
                    && rest.iter().all(|b| allows(self.rest, *b))
            }
            None => false,
        };
        if accepted {
            Ok(())
        } else {
            self.explain(value)
        }
    }

    /// Why `value` breaks the rule.
    #[cold]
    #[inline(never)]
    fn explain(&self, value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Err("must not be empty".into());
        }
        if value.chars().count() > self.max_len {
            return Err(format!("must be at most {} characters", self.max_len));
        }
        if value.contains('#') {
            return Err("must not contain '#'".into());
        }
        let allowed = |mask: u8| move |c: &char| c.is_ascii() && allows(mask, *c as u8);
        let mut chars = value.chars();
        if !chars.next().as_ref().is_some_and(allowed(self.first)) {
            return Err(format!("must start with {}", self.first_rule));
        }
        let rest = allowed(self.rest);
        if let Some(bad) = chars.find(|c| !rest(c)) {
            return Err(format!("contains {bad:?}; allowed: {}", self.rest_rule));
        }
        Ok(())
    }
}

/// Validates an entity id (also used for parent ids); `field` names it in the error.
#[inline]
pub fn validate_identifier(field: Field, value: &str) -> Result<(), Error> {
    IDENTIFIER
        .check(value)
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
    NAME.check(value)
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
    RESOURCE.check(value).map_err(|reason| Error::InvalidName {
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
    NAME.check(value).map_err(|reason| Error::InvalidName {
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

    /// Every byte, in every position, against the rules as the table above states them.
    #[test]
    fn every_byte_is_classed_as_the_rules_say() {
        let alnum = |b: u8| b.is_ascii_alphanumeric();
        for b in 0..=255u8 {
            let id_rest = alnum(b) || b"_.-:@".contains(&b);
            let name_rest = alnum(b) || b"_.-".contains(&b);
            let resource_rest = name_rest || b == b'/';
            let s = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            // `a` + byte: the byte as a follower; byte alone: as the first.
            let (follow, lead) = (s(&[b'a', b]), s(&[b]));
            assert_eq!(validate_entity_id(&follow).is_ok(), id_rest, "id {b:#x}");
            assert_eq!(validate_entity_id(&lead).is_ok(), alnum(b), "id {b:#x}");
            assert_eq!(validate_resource(&follow).is_ok(), resource_rest, "{b:#x}");
            assert_eq!(
                validate_resource(&lead).is_ok(),
                b.is_ascii_alphabetic(),
                "resource {b:#x}"
            );
            assert_eq!(validate_namespace(&follow).is_ok(), name_rest, "{b:#x}");
        }
    }

    #[test]
    fn error_names_field_and_truncates_value() {
        let err = validate_entity_id(&format!("#{}", "x".repeat(100))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("entity_id"), "{text}");
        assert!(text.contains("..."), "{text}");
    }
}
