//! Enrollment tokens: `<id>.<secret>`, shaped like Kubernetes bootstrap tokens
//! (`[a-z0-9]{6}.[a-z0-9]{16}`). The id is public and finds the token's record; the secret
//! is stored only as its sha256 and compared in constant time. A token never appears in a
//! `Debug` rendering, so it cannot leak into a log line by accident.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// An enrollment token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    id: String,
    secret: String,
}

impl Token {
    /// A fresh random token from the OS's random source.
    pub fn generate() -> Result<Token> {
        Ok(Token {
            id: random_string(ID_LEN)?,
            secret: random_string(SECRET_LEN)?,
        })
    }

    /// The public half: what the token's record is found by.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Lower-case hex sha256 of the secret half: all a server stores.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether this token's secret hashes to `stored_hash` (hex), compared in constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        let ours = self.secret_hash();
        ours.len() == stored_hash.len() && bool::from(ours.as_bytes().ct_eq(stored_hash.as_bytes()))
    }

    /// Checks a token id on its own (`[a-z0-9]{6}`), e.g. from `token delete ID`.
    pub fn check_id(id: &str) -> Result<()> {
        if id.len() == ID_LEN && id.bytes().all(|b| ALPHABET.contains(&b)) {
            Ok(())
        } else {
            Err(Error::invalid(
                "token id",
                id,
                "must be 6 characters of a-z 0-9",
            ))
        }
    }
}

fn random_string(len: usize) -> Result<String> {
    // Rejection sampling keeps every character equally likely (256 is not a multiple of 36).
    let mut out = String::with_capacity(len);
    let limit = 256 - 256 % ALPHABET.len();
    while out.len() < len {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).map_err(|e| Error::Random(e.to_string()))?;
        for b in buf {
            if (b as usize) < limit && out.len() < len {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

impl FromStr for Token {
    type Err = Error;

    fn from_str(s: &str) -> Result<Token> {
        let bad = |why: &str| Error::invalid("enrollment token", &redact(s), why);
        let (id, secret) = s
            .split_once('.')
            .ok_or_else(|| bad("must be <id>.<secret>"))?;
        Token::check_id(id).map_err(|_| bad("the id must be 6 characters of a-z 0-9"))?;
        if secret.len() != SECRET_LEN || !secret.bytes().all(|b| ALPHABET.contains(&b)) {
            return Err(bad("the secret must be 16 characters of a-z 0-9"));
        }
        Ok(Token {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

/// What a refused token looks like in an error: its id part only.
fn redact(s: &str) -> String {
    match s.split_once('.') {
        Some((id, _)) => format!("{id}.<redacted>"),
        None => "<redacted>".into(),
    }
}

/// The full `<id>.<secret>`: only for handing the token to whoever must present it.
impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

crate::serde_as_text!(Token);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_round_trip() {
        let t = Token::generate().unwrap();
        let text = t.to_string();
        assert_eq!(text.len(), 23);
        let back: Token = text.parse().unwrap();
        assert_eq!(back, t);
        assert_ne!(Token::generate().unwrap(), t, "two tokens differ");
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug hides the secret"
        );
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_the_secret() {
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcdeF",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef0",
            "abc$ef.0123456789abcdef",
            "abcdef.01234567 9abcdef",
            "abcdef.0123456789abcdef\n",
        ] {
            let err = bad.parse::<Token>().expect_err(bad).to_string();
            assert!(!err.contains("0123456789"), "{err} echoes the secret");
        }
    }

    #[test]
    fn hash_match_is_exact() {
        let t: Token = "abcdef.0123456789abcdef".parse().unwrap();
        let h = t.secret_hash();
        assert_eq!(h.len(), 64);
        assert!(t.matches(&h));
        let other: Token = "abcdef.0123456789abcdee".parse().unwrap();
        assert!(!other.matches(&h));
        assert!(!t.matches(""));
        assert!(!t.matches(&h[..63]));
    }

    #[test]
    fn ids() {
        assert!(Token::check_id("abc123").is_ok());
        for bad in ["abc12", "abc1234", "ABC123", "../etc", "abc-12"] {
            assert!(Token::check_id(bad).is_err(), "{bad}");
        }
    }
}
