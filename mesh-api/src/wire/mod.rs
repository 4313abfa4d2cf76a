//! Conversions between the domain types and the protobuf messages. Domain → wire cannot
//! fail; wire → domain validates every field and names the first bad one.

mod objects;
mod watch;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A wire value that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {problem}")]
pub struct WireError {
    field: String,
    problem: String,
}

impl WireError {
    fn new(field: &str, problem: impl fmt::Display) -> Self {
        WireError {
            field: field.to_owned(),
            problem: problem.to_string(),
        }
    }

    /// The path of the offending field, such as `snapshot.workloads[2].ips[0]`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Prefixes the field path with the enclosing field.
    fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

fn required<T>(field: &str, value: Option<T>) -> Result<T, WireError> {
    value.ok_or_else(|| WireError::new(field, "missing"))
}

fn non_empty(field: &str, value: String) -> Result<String, WireError> {
    if value.is_empty() {
        return Err(WireError::new(field, "empty"));
    }
    Ok(value)
}

fn ip(field: &str, bytes: &[u8]) -> Result<IpAddr, WireError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(Ipv4Addr::from(v4).into());
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(Ipv6Addr::from(v6).into());
    }
    Err(WireError::new(
        field,
        format!("{} bytes is not an IPv4 or IPv6 address", bytes.len()),
    ))
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port(field: &str, value: u32) -> Result<u16, WireError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(WireError::new(field, format!("{value} is not a port (1-65535)"))),
    }
}

/// Converts each element, naming a failing one as `field[index]`.
fn each<T, U>(
    field: &str,
    items: Vec<T>,
    convert: impl Fn(T) -> Result<U, WireError>,
) -> Result<Vec<U>, WireError> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| convert(item).map_err(|e| e.within(&format!("{field}[{i}]"))))
        .collect()
}

/// Like [`each`] for leaf values, whose checker gets the element's own field name.
fn each_leaf<T, U>(
    field: &str,
    items: Vec<T>,
    convert: impl Fn(&str, T) -> Result<U, WireError>,
) -> Result<Vec<U>, WireError> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| convert(&format!("{field}[{i}]"), item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_and_ports() {
        assert_eq!(ip("ip", &[10, 0, 0, 1]), Ok("10.0.0.1".parse().unwrap()));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip("ip", &ip_bytes(v6)), Ok(v6));
        assert_eq!(ip("ip", &[1, 2, 3]).unwrap_err().field(), "ip");
        assert_eq!(port("port", 443), Ok(443));
        assert!(port("port", 0).is_err());
        assert!(port("port", 65536).is_err());
    }

    #[test]
    fn error_names_nested_field() {
        let err = each("xs", vec![1u32, 0], |p| port("port", p)).unwrap_err();
        assert_eq!(err.field(), "xs[1].port");
        assert_eq!(
            err.to_string(),
            "invalid field `xs[1].port`: 0 is not a port (1-65535)"
        );
    }
}
