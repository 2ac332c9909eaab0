//! Value spaces: how each kind of pool maps its values to offsets `0..size`,
//! so that one allocation engine serves every kind.
//!
//! An allocation is a *run* of `units` offsets starting at `offset`, aligned
//! to `units`. For integer, address and set pools a run is always one unit;
//! a prefix pool counts in units of its finest prefix length, and a prefix of
//! length `l` is the aligned run of `2^(finest - l)` units (buddy style), so
//! prefixes of mixed lengths can never overlap.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The largest number of values a pool may hold: offsets are u64.
pub const MAX_POOL_SIZE: u128 = 1 << 64;

/// What a pool hands out. Persisted as part of the pool definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PoolKind {
    /// Integers `lo..=hi`.
    Range { lo: u64, hi: u64 },
    /// Single addresses of a CIDR. For IPv4 subnets of /30 or wider the
    /// network and broadcast addresses are reserved unless `all_addresses`.
    Addresses {
        cidr: IpNet,
        #[serde(default)]
        all_addresses: bool,
    },
    /// Aligned sub-prefixes of `cidr`; `prefix_len` is the default length
    /// handed out and `max_prefix_len` the finest length that may be asked for.
    Prefixes {
        cidr: IpNet,
        prefix_len: u8,
        max_prefix_len: u8,
    },
    /// An enumerated list of strings.
    Set { values: Vec<String> },
}

/// A pool kind made ready for fast value/offset conversion.
#[derive(Debug, Clone)]
pub struct ValueSpace {
    kind: PoolKind,
    size: u128,
    /// Offset ranges `[start, end)` reserved by the kind itself (IPv4 edges).
    builtin_reserved: Vec<(u64, u64)>,
    set_index: HashMap<String, u64>,
}

/// A run of units: the shape of one allocated value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Run {
    pub offset: u64,
    pub units: u64,
}

impl Run {
    pub fn single(offset: u64) -> Self {
        Run { offset, units: 1 }
    }
    /// One past the last unit (as u128: a run may end at 2^64).
    pub fn end(&self) -> u128 {
        self.offset as u128 + self.units as u128
    }
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn u128_to_ip(v: u128, like: &IpNet) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4((v as u32).into()),
        IpNet::V6(_) => IpAddr::V6(v.into()),
    }
}

fn bits(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    }
}

/// Parses a CIDR strictly: host bits must be zero, so a typo is not silently
/// widened to a different network.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let net: IpNet = s.trim().parse().map_err(|_| {
        CoreError::InvalidSpec(format!(
            "'{s}' is not a CIDR (expected e.g. 10.0.0.0/24 or 2001:db8::/64)"
        ))
    })?;
    if net.trunc() != net {
        return Err(CoreError::InvalidSpec(format!(
            "'{s}' has host bits set; did you mean {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

impl ValueSpace {
    /// Validates a kind and prepares it.
    pub fn new(kind: PoolKind) -> Result<Self> {
        let mut builtin_reserved = Vec::new();
        let mut set_index = HashMap::new();
        let size: u128 = match &kind {
            PoolKind::Range { lo, hi } => {
                if lo > hi {
                    return Err(CoreError::InvalidSpec(format!(
                        "range {lo}-{hi} is inverted (low > high)"
                    )));
                }
                (*hi - *lo) as u128 + 1
            }
            PoolKind::Addresses {
                cidr,
                all_addresses,
            } => {
                if cidr.trunc() != *cidr {
                    return Err(CoreError::InvalidSpec(format!("{cidr} has host bits set")));
                }
                let host_bits = bits(cidr) - cidr.prefix_len();
                if host_bits > 64 {
                    return Err(CoreError::InvalidSpec(format!(
                        "{cidr} holds 2^{host_bits} addresses; an address pool holds at most 2^64 (use a /64 or longer, or a prefix pool)"
                    )));
                }
                let size = 1u128 << host_bits;
                if matches!(cidr, IpNet::V4(_)) && host_bits >= 2 && !all_addresses {
                    builtin_reserved.push((0, 1));
                    let last = (size - 1) as u64;
                    builtin_reserved.push((last, last + 1));
                }
                size
            }
            PoolKind::Prefixes {
                cidr,
                prefix_len,
                max_prefix_len,
            } => {
                if cidr.trunc() != *cidr {
                    return Err(CoreError::InvalidSpec(format!("{cidr} has host bits set")));
                }
                let parent = cidr.prefix_len();
                if *prefix_len < parent || *prefix_len > bits(cidr) {
                    return Err(CoreError::InvalidSpec(format!(
                        "prefix length /{prefix_len} does not fit in {cidr} (must be between /{parent} and /{})",
                        bits(cidr)
                    )));
                }
                if *max_prefix_len < *prefix_len || *max_prefix_len > bits(cidr) {
                    return Err(CoreError::InvalidSpec(format!(
                        "finest prefix length /{max_prefix_len} must be between the default /{prefix_len} and /{}",
                        bits(cidr)
                    )));
                }
                let unit_bits = max_prefix_len - parent;
                if unit_bits > 64 {
                    return Err(CoreError::InvalidSpec(format!(
                        "{cidr} split down to /{max_prefix_len} makes 2^{unit_bits} units; at most 2^64 (lower the finest prefix length)"
                    )));
                }
                1u128 << unit_bits
            }
            PoolKind::Set { values } => {
                if values.is_empty() {
                    return Err(CoreError::InvalidSpec(
                        "a set pool needs at least one value".into(),
                    ));
                }
                for (i, v) in values.iter().enumerate() {
                    if v.is_empty() {
                        return Err(CoreError::InvalidSpec(
                            "set values must not be empty".into(),
                        ));
                    }
                    if set_index.insert(v.clone(), i as u64).is_some() {
                        return Err(CoreError::InvalidSpec(format!(
                            "set value '{v}' is listed twice"
                        )));
                    }
                }
                values.len() as u128
            }
        };
        Ok(ValueSpace {
            kind,
            size,
            builtin_reserved,
            set_index,
        })
    }

    pub fn kind(&self) -> &PoolKind {
        &self.kind
    }

    /// Number of units (offsets) in the pool.
    pub fn size(&self) -> u128 {
        self.size
    }

    /// Offset ranges the kind reserves by itself.
    pub fn builtin_reserved(&self) -> &[(u64, u64)] {
        &self.builtin_reserved
    }

    /// True for prefix pools, whose claims have a length of their own and so
    /// always need a record beside their bits.
    pub fn is_prefix(&self) -> bool {
        matches!(self.kind, PoolKind::Prefixes { .. })
    }

    /// Units a default allocation takes.
    pub fn default_units(&self) -> u64 {
        match &self.kind {
            PoolKind::Prefixes {
                prefix_len,
                max_prefix_len,
                ..
            } => 1u64 << (max_prefix_len - prefix_len),
            _ => 1,
        }
    }

    /// Units of a prefix of length `len` (prefix pools only).
    pub fn units_for_prefix_len(&self, len: u8) -> Result<u64> {
        match &self.kind {
            PoolKind::Prefixes {
                cidr,
                max_prefix_len,
                ..
            } => {
                if len < cidr.prefix_len() || len > *max_prefix_len {
                    return Err(CoreError::InvalidValue(format!(
                        "prefix length /{len} is outside this pool (between /{} and /{max_prefix_len})",
                        cidr.prefix_len()
                    )));
                }
                let shift = max_prefix_len - len;
                if shift >= 64 {
                    // The whole 2^64-unit space as one run cannot be expressed as u64 units.
                    return Err(CoreError::InvalidValue(format!(
                        "prefix length /{len} is too short to allocate here"
                    )));
                }
                Ok(1u64 << shift)
            }
            _ => Err(CoreError::InvalidValue(
                "a prefix length only applies to prefix pools".into(),
            )),
        }
    }

    /// Parses a value given by a user into the run it denotes.
    pub fn parse(&self, s: &str) -> Result<Run> {
        let s = s.trim();
        match &self.kind {
            PoolKind::Range { lo, hi } => {
                let v: u64 = s.parse().map_err(|_| {
                    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                        CoreError::InvalidValue(format!(
                            "{s} is outside the pool's range {lo}-{hi}"
                        ))
                    } else {
                        CoreError::InvalidValue(format!("'{s}' is not an integer"))
                    }
                })?;
                if v < *lo || v > *hi {
                    return Err(CoreError::InvalidValue(format!(
                        "{v} is outside the pool's range {lo}-{hi}"
                    )));
                }
                Ok(Run::single(v - lo))
            }
            PoolKind::Addresses { cidr, .. } => {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| CoreError::InvalidValue(format!("'{s}' is not an IP address")))?;
                if !cidr.contains(&ip) {
                    return Err(CoreError::InvalidValue(format!(
                        "{ip} is outside the pool's network {cidr}"
                    )));
                }
                Ok(Run::single(
                    (ip_to_u128(ip) - ip_to_u128(cidr.network())) as u64,
                ))
            }
            PoolKind::Prefixes {
                cidr,
                max_prefix_len,
                ..
            } => {
                let net: IpNet = s.parse().map_err(|_| {
                    CoreError::InvalidValue(format!(
                        "'{s}' is not a prefix (expected e.g. 10.0.1.0/24)"
                    ))
                })?;
                if net.trunc() != net {
                    return Err(CoreError::InvalidValue(format!(
                        "'{s}' has host bits set; did you mean {}?",
                        net.trunc()
                    )));
                }
                if !cidr.contains(&net) {
                    return Err(CoreError::InvalidValue(format!(
                        "{net} is outside the pool's network {cidr}"
                    )));
                }
                let units = self.units_for_prefix_len(net.prefix_len())?;
                let shift = bits(cidr) - max_prefix_len;
                let offset =
                    ((ip_to_u128(net.network()) - ip_to_u128(cidr.network())) >> shift) as u64;
                Ok(Run { offset, units })
            }
            PoolKind::Set { .. } => {
                self.set_index
                    .get(s)
                    .map(|&o| Run::single(o))
                    .ok_or_else(|| {
                        CoreError::InvalidValue(format!("'{s}' is not one of the pool's values"))
                    })
            }
        }
    }

    /// Parses a reservation: a single value, or an inclusive range `A-B` of
    /// values (integers and addresses), or a prefix (prefix pools).
    pub fn parse_reservation(&self, s: &str) -> Result<(u64, u64)> {
        let s = s.trim();
        let splittable = matches!(
            self.kind,
            PoolKind::Range { .. } | PoolKind::Addresses { .. }
        );
        if splittable {
            if let Some((a, b)) = s.split_once('-') {
                let a = self.parse(a)?;
                let b = self.parse(b)?;
                if a.offset > b.offset {
                    return Err(CoreError::InvalidValue(format!(
                        "reserved range '{s}' is inverted"
                    )));
                }
                return Ok((a.offset, b.offset + 1));
            }
        }
        let run = self.parse(s)?;
        Ok((run.offset, run.offset + run.units))
    }

    /// The canonical text of a run: decimal integer, IP address, CIDR
    /// prefix, or the set string.
    pub fn format(&self, run: Run) -> String {
        match &self.kind {
            PoolKind::Range { lo, .. } => (lo + run.offset).to_string(),
            PoolKind::Addresses { cidr, .. } => {
                u128_to_ip(ip_to_u128(cidr.network()) + run.offset as u128, cidr).to_string()
            }
            PoolKind::Prefixes {
                cidr,
                max_prefix_len,
                ..
            } => {
                let shift = bits(cidr) - max_prefix_len;
                let addr = u128_to_ip(
                    ip_to_u128(cidr.network()) + ((run.offset as u128) << shift),
                    cidr,
                );
                let len = max_prefix_len - run.units.trailing_zeros() as u8;
                format!("{addr}/{len}")
            }
            PoolKind::Set { values } => {
                values.get(run.offset as usize).cloned().unwrap_or_default()
            }
        }
    }

    /// Formats a single unit offset (used in messages).
    pub fn format_offset(&self, offset: u64) -> String {
        self.format(Run::single(offset))
    }

    /// A short human description, e.g. `range 1-1000` or `prefixes of 10.0.0.0/8 (/24)`.
    pub fn describe(&self) -> String {
        match &self.kind {
            PoolKind::Range { lo, hi } => format!("integers {lo}-{hi}"),
            PoolKind::Addresses { cidr, .. } => format!("addresses of {cidr}"),
            PoolKind::Prefixes {
                cidr, prefix_len, ..
            } => format!("/{prefix_len} prefixes of {cidr}"),
            PoolKind::Set { values } => format!("set of {} values", values.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_addresses_reserve_edges() {
        let s = ValueSpace::new(PoolKind::Addresses {
            cidr: parse_cidr("10.0.0.0/24").unwrap(),
            all_addresses: false,
        })
        .unwrap();
        assert_eq!(s.size(), 256);
        assert_eq!(s.builtin_reserved(), &[(0, 1), (255, 256)]);
        assert_eq!(s.parse("10.0.0.7").unwrap(), Run::single(7));
        assert_eq!(s.format(Run::single(7)), "10.0.0.7");
        assert!(s.parse("10.0.1.1").is_err());
        let p2p = ValueSpace::new(PoolKind::Addresses {
            cidr: parse_cidr("10.0.0.0/31").unwrap(),
            all_addresses: false,
        })
        .unwrap();
        assert!(p2p.builtin_reserved().is_empty());
    }

    #[test]
    fn ipv6_pool_limits() {
        assert!(ValueSpace::new(PoolKind::Addresses {
            cidr: parse_cidr("2001:db8::/48").unwrap(),
            all_addresses: false
        })
        .is_err());
        let s = ValueSpace::new(PoolKind::Addresses {
            cidr: parse_cidr("2001:db8::/64").unwrap(),
            all_addresses: false,
        })
        .unwrap();
        assert_eq!(s.size(), 1u128 << 64);
        assert_eq!(
            s.format(Run::single(u64::MAX)),
            "2001:db8::ffff:ffff:ffff:ffff"
        );
        assert_eq!(
            s.parse("2001:db8::ffff:ffff:ffff:ffff").unwrap(),
            Run::single(u64::MAX)
        );
    }

    #[test]
    fn prefixes_round_trip() {
        let s = ValueSpace::new(PoolKind::Prefixes {
            cidr: parse_cidr("10.0.0.0/8").unwrap(),
            prefix_len: 24,
            max_prefix_len: 32,
        })
        .unwrap();
        assert_eq!(s.default_units(), 256);
        let r = s.parse("10.0.1.0/24").unwrap();
        assert_eq!(
            r,
            Run {
                offset: 256,
                units: 256
            }
        );
        assert_eq!(s.format(r), "10.0.1.0/24");
        assert_eq!(
            s.format(Run {
                offset: 64,
                units: 64
            }),
            "10.0.0.64/26"
        );
        assert!(s.parse("10.0.1.5/24").is_err());
        assert!(s.parse("11.0.0.0/24").is_err());
    }

    #[test]
    fn bad_specs() {
        assert!(ValueSpace::new(PoolKind::Range { lo: 5, hi: 1 }).is_err());
        assert!(parse_cidr("10.0.0.1/24").is_err());
        assert!(parse_cidr("10.0.0/24x").is_err());
        assert!(ValueSpace::new(PoolKind::Set {
            values: vec!["a".into(), "a".into()]
        })
        .is_err());
        assert_eq!(
            ValueSpace::new(PoolKind::Range {
                lo: 0,
                hi: u64::MAX
            })
            .unwrap()
            .size(),
            MAX_POOL_SIZE
        );
    }
}
