//! Update and condition expressions with positional aliases: attribute names are never
//! spliced into expression text (limit names may hold `-` and `.`, and `ttl`, `name` and
//! friends are reserved words).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

/// Builds the alias maps of one request.
#[derive(Debug, Default)]
pub(crate) struct Expr {
    names: HashMap<String, String>,
    by_attr: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Expr {
    /// The alias of an attribute name (`#n0`, `#n1`, ...), the same one each time.
    pub fn name(&mut self, attr: &str) -> String {
        if let Some(alias) = self.by_attr.get(attr) {
            return alias.clone();
        }
        let alias = format!("#n{}", self.by_attr.len());
        self.by_attr.insert(attr.to_string(), alias.clone());
        self.names.insert(alias.clone(), attr.to_string());
        alias
    }

    /// The alias of a value (`:v0`, `:v1`, ...).
    pub fn value(&mut self, value: AttributeValue) -> String {
        let alias = format!(":v{}", self.values.len());
        self.values.insert(alias.clone(), value);
        alias
    }

    /// The alias of a number value.
    pub fn num(&mut self, value: i64) -> String {
        self.value(AttributeValue::N(value.to_string()))
    }

    /// The name map, `None` when empty (DynamoDB rejects an empty map).
    pub fn names(&self) -> Option<HashMap<String, String>> {
        (!self.names.is_empty()).then(|| self.names.clone())
    }

    /// The value map, `None` when empty.
    pub fn values(&self) -> Option<HashMap<String, AttributeValue>> {
        (!self.values.is_empty()).then(|| self.values.clone())
    }
}

/// The clauses of an update expression, joined in DynamoDB's syntax.
#[derive(Debug, Default)]
pub(crate) struct Update {
    /// `SET` actions.
    pub set: Vec<String>,
    /// `ADD` actions.
    pub add: Vec<String>,
    /// `REMOVE` actions.
    pub remove: Vec<String>,
    /// Conditions, joined with `AND`.
    pub conditions: Vec<String>,
}

impl Update {
    /// The update expression.
    pub fn expression(&self) -> String {
        let mut out = String::new();
        for (keyword, parts) in [
            ("SET", &self.set),
            ("ADD", &self.add),
            ("REMOVE", &self.remove),
        ] {
            if !parts.is_empty() {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(keyword);
                out.push(' ');
                out.push_str(&parts.join(", "));
            }
        }
        out
    }

    /// The condition expression, if any.
    pub fn condition(&self) -> Option<String> {
        (!self.conditions.is_empty()).then(|| self.conditions.join(" AND "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_positional_and_reused() {
        let mut e = Expr::default();
        let a = e.name("b_tok-en.s_tk");
        let b = e.name("ttl");
        assert_eq!((a.as_str(), b.as_str()), ("#n0", "#n1"));
        assert_eq!(e.name("b_tok-en.s_tk"), "#n0");
        assert_eq!(e.num(5), ":v0");
        let u = Update {
            set: vec![format!("{a} = {}", ":v0")],
            add: vec![format!("{b} :v0")],
            remove: vec![],
            conditions: vec!["attribute_exists(PK)".into(), format!("{a} >= :v0")],
        };
        assert_eq!(u.expression(), "SET #n0 = :v0 ADD #n1 :v0");
        assert_eq!(
            u.condition().unwrap(),
            "attribute_exists(PK) AND #n0 >= :v0"
        );
    }
}
