//! SMBIOS system UUIDs, the second identity a machine is recognised by (after its boot
//! MAC). Firmware without a real UUID reports all zeros or all ones; such a placeholder is
//! parsed but is no identity ([`Uuid::is_placeholder`]): two boards sharing it must never be
//! taken for one machine.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A UUID in its canonical lower-case `8-4-4-4-12` form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(String);

impl Uuid {
    /// All zeros or all ones: what firmware reports when it has no UUID.
    pub fn is_placeholder(&self) -> bool {
        let hex = self.0.chars().filter(|c| *c != '-');
        hex.clone().all(|c| c == '0') || hex.into_iter().all(|c| c == 'f')
    }

    /// The canonical text (also a valid Kubernetes label value).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Uuid {
    type Err = Error;

    fn from_str(s: &str) -> Result<Uuid, Error> {
        let lower = s.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('-').collect();
        let ok = parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
            && parts
                .iter()
                .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()));
        if ok {
            Ok(Uuid(lower))
        } else {
            Err(Error::invalid("UUID", s, "must be 8-4-4-4-12 hex digits"))
        }
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

crate::serde_as_text!(Uuid);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_placeholders() {
        let u: Uuid = "4C4C4544-0000-1000-8000-000000000001".parse().unwrap();
        assert_eq!(u.as_str(), "4c4c4544-0000-1000-8000-000000000001");
        assert!(!u.is_placeholder());
        for p in [
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
        ] {
            assert!(p.parse::<Uuid>().unwrap().is_placeholder(), "{p}");
        }
        for bad in [
            "",
            "4c4c4544-0000-1000-8000-00000000001",
            "4c4c4544_0000-1000-8000-000000000001",
            "../../x",
            "4c4c4544-0000-1000-8000-00000000000g",
        ] {
            assert!(bad.parse::<Uuid>().is_err(), "{bad}");
        }
    }
}
