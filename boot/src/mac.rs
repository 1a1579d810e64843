//! MAC addresses: the one identity a netbooting machine has before it runs our code, so it is
//! parsed strictly and rendered in exactly three canonical forms.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// From a DHCP `chaddr` (which must hold at least six bytes for Ethernet).
    pub fn from_chaddr(chaddr: &[u8]) -> Option<Mac> {
        chaddr.get(..6)?.try_into().ok().map(Mac)
    }

    /// `52-54-00-12-34-56`: the form used in URLs and Kubernetes label values.
    pub fn dashed(&self) -> String {
        self.join('-')
    }

    /// `525400123456`: the form used in object names.
    pub fn compact(&self) -> String {
        hex::encode(self.0)
    }

    /// The name of the `Machine` first seen with this MAC (`mac-525400123456`). Derived from
    /// the MAC, so two writers racing on one machine (two PXE servers, PXE and enrollment)
    /// try to create the same object and exactly one wins.
    pub fn machine_name(&self) -> String {
        format!("mac-{}", self.compact())
    }

    fn join(&self, sep: char) -> String {
        let mut s = String::with_capacity(17);
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(sep);
            }
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// `52:54:00:12:34:56`, lower case: the form stored in `Machine.spec.macs`.
impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.join(':'))
    }
}

/// Accepts `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff` (any case); nothing else.
impl FromStr for Mac {
    type Err = Error;

    fn from_str(s: &str) -> Result<Mac, Error> {
        let bad = || Error::invalid("MAC address", s, "must be six hex pairs joined by : or -");
        if s.len() != 17 {
            return Err(bad());
        }
        let sep = s.as_bytes()[2];
        if sep != b':' && sep != b'-' {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (i, part) in s.split(sep as char).enumerate() {
            if i >= 6 || part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            out[i] = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(Mac(out))
    }
}

crate::serde_as_text!(Mac);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(m.dashed(), "52-54-00-ab-cd-0f");
        assert_eq!(m.compact(), "525400abcd0f");
        assert_eq!(m.machine_name(), "mac-525400abcd0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52:54-00:ab:cd:0f",
            "52:54:00:ab:cd:0g",
            "52:54:00:ab:cd:+f",
            "../../etc/passwd",
            "52:54:00:ab:cd:0\n",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
        assert_eq!(Mac::from_chaddr(&[1, 2, 3]), None);
        assert_eq!(
            Mac::from_chaddr(&[1, 2, 3, 4, 5, 6, 0, 0]),
            Some(Mac([1, 2, 3, 4, 5, 6]))
        );
    }

    #[test]
    fn serde_is_the_colon_form() {
        let m: Mac = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"52:54:00:12:34:56\"");
        assert_eq!(
            serde_json::from_str::<Mac>("\"52-54-00-12-34-56\"").unwrap(),
            m
        );
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
    }
}
