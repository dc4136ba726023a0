//! Reading the fields of a JSON object with errors that name the field: the one reader behind
//! the result's decoding ([`super::types`]) and the configurations of both plugins
//! (`plugin::config`, `ipam::config`). `null` counts as absent, and a blank string as no
//! string; strings are trimmed.

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// A field that is there but wrong: the field as the caller names it ("ipam.ranges[0][1].subnet")
/// and what is wrong with it. Each caller turns it into its own error: an invalid configuration,
/// or a result that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        Self { field: field.to_string(), problem: problem.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.problem)
    }
}

impl std::error::Error for FieldError {}

/// A configuration field that is wrong is an invalid configuration (code 7).
impl From<FieldError> for super::CniError {
    fn from(e: FieldError) -> Self {
        super::CniError::invalid_config(e.to_string())
    }
}

type Result<T> = std::result::Result<T, FieldError>;

/// The value of `key`, unless it is absent or null.
pub fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A string, trimmed; a blank one counts as absent.
pub fn string<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Result<Option<&'a str>> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim())),
        Some(other) => Err(FieldError::new(field, format!("must be a string, got {other}"))),
    }
}

pub fn boolean(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<bool>> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(FieldError::new(field, format!("must be true or false, got {other}"))),
    }
}

/// A whole number that fits in a u32.
pub fn number(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<u32>> {
    match get(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| FieldError::new(field, format!("must be a non-negative integer, got {v}"))),
    }
}

pub fn object<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Result<Option<&'a Map<String, Value>>> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(FieldError::new(field, format!("must be an object, got {other}"))),
    }
}

pub fn list<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Result<Option<&'a [Value]>> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Array(l)) => Ok(Some(l)),
        Some(other) => Err(FieldError::new(field, format!("must be a list, got {other}"))),
    }
}

/// An item of a list that must be an object.
pub fn item_object<'a>(item: &'a Value, field: &str) -> Result<&'a Map<String, Value>> {
    item.as_object().ok_or_else(|| FieldError::new(field, "must be an object"))
}

/// An absolute path without "..": it names a directory or file the plugin writes to.
pub fn abs_path(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<PathBuf>> {
    match string(obj, key, field)? {
        None => Ok(None),
        Some(p) if p.starts_with('/') && !p.split('/').any(|c| c == "..") => Ok(Some(PathBuf::from(p))),
        Some(p) => Err(FieldError::new(field, format!("\"{p}\" must be an absolute path without \"..\""))),
    }
}

pub fn ip(text: &str, field: &str) -> Result<IpAddr> {
    text.parse().map_err(|_| FieldError::new(field, format!("\"{text}\" is not an IP address")))
}

/// An address with its prefix length ("10.244.1.7/24"); host bits may be set.
pub fn cidr(text: &str, field: &str) -> Result<IpNetwork> {
    text.parse().map_err(|_| FieldError::new(field, format!("\"{text}\" is not a CIDR")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn absent_null_and_blank_are_none_and_wrong_types_name_the_field() {
        let o = obj(json!({"a": " x ", "b": null, "c": "  ", "d": 5, "e": true, "f": [1], "g": {}}));
        assert_eq!(string(&o, "a", "a").unwrap(), Some("x"));
        assert_eq!(string(&o, "b", "b").unwrap(), None);
        assert_eq!(string(&o, "c", "c").unwrap(), None);
        assert_eq!(string(&o, "zz", "zz").unwrap(), None);
        assert_eq!(string(&o, "d", "ipam.d").unwrap_err().to_string(), "ipam.d must be a string, got 5");
        assert_eq!(boolean(&o, "e", "e").unwrap(), Some(true));
        assert!(boolean(&o, "d", "d").unwrap_err().to_string().contains("true or false"));
        assert_eq!(number(&o, "d", "d").unwrap(), Some(5));
        assert!(number(&o, "a", "a").is_err());
        assert_eq!(list(&o, "f", "f").unwrap().map(<[Value]>::len), Some(1));
        assert!(list(&o, "g", "g").is_err());
        assert!(object(&o, "g", "g").unwrap().is_some());
        assert!(object(&o, "f", "f").is_err());
    }

    #[test]
    fn paths_and_addresses() {
        let o = obj(json!({"p": "/var/lib/x", "q": "rel/x", "r": "/a/../b"}));
        assert_eq!(abs_path(&o, "p", "p").unwrap(), Some(PathBuf::from("/var/lib/x")));
        assert!(abs_path(&o, "q", "q").is_err());
        assert_eq!(
            abs_path(&o, "r", "dataDir").unwrap_err().to_string(),
            "dataDir \"/a/../b\" must be an absolute path without \"..\""
        );
        assert_eq!(ip("10.0.0.1", "gw").unwrap().to_string(), "10.0.0.1");
        assert_eq!(ip("banana", "gw").unwrap_err().to_string(), "gw \"banana\" is not an IP address");
        assert_eq!(cidr("10.0.0.7/24", "a").unwrap().prefix(), 24);
        assert!(cidr("10.0.0.7", "a").is_ok_and(|n| n.prefix() == 32));
        assert!(cidr("x/24", "a").is_err());
    }
}
