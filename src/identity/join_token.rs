//! The join token: what lets a new node into a mesh once.
//!
//! Pure. One type and one format rule for every place a token passes:
//! `mesh-rendezvous token create` makes one ([`JoinToken::new`]),
//! `meshd join --token/--token-file` parses it ([`FromStr`]) and stores it in
//! `STATE_DIR/join.token`, `meshd run` reads it back into the rendezvous
//! client's config and sends it in its hello, and the registry parses what
//! the hello carries with the same rule before it looks the id up.
//!
//! # The rule
//!
//! `ID.SECRET`: an id of 1 to [`MAX_TOKEN_ID`] characters from
//! `[A-Za-z0-9_-]`, a dot, and a secret of characters from the unpadded
//! base64url alphabet (the same set), at most [`MAX_TOKEN`] bytes in all.
//! Every token a rendezvous ever issued fits it (0.1.0 and 0.2.0 print 8
//! hex digits, a dot and 32 random bytes as 43 base64url characters), and
//! so does every token a 0.1.0/0.2.0 `meshd join` stored that any registry
//! could ever accept. Whether the secret is the right one, and 32 bytes
//! long, is the registry's question: the answer to a wrong secret is the
//! same whatever its length (see [`crate::rendezvous::registry`]).
//!
//! The secret is never printed: `Debug` shows the id only, and there is no
//! `Display`; [`JoinToken::expose`] is for the token file and the hello.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Longest token id accepted.
pub const MAX_TOKEN_ID: usize = 32;
/// Longest token accepted, id, dot and secret together.
pub const MAX_TOKEN: usize = 256;

/// A join token of the right shape. See the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The whole `ID.SECRET` text.
    text: String,
    /// Where the dot is.
    dot: usize,
}

/// Why a text is not a join token. The messages never quote the text: it
/// may be a real token pasted wrongly.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JoinTokenError {
    #[error("the join token is empty; {COPY}")]
    Empty,
    #[error("the join token is {len} bytes long, at most {MAX_TOKEN} are accepted; {COPY}")]
    TooLong { len: usize },
    #[error("the join token has no '.' between its id and its secret; {COPY}")]
    NoDot,
    #[error(
        "the join token's id is not 1 to {MAX_TOKEN_ID} characters from a-z, A-Z, 0-9, '-' and \
         '_'; {COPY}"
    )]
    BadId,
    #[error(
        "the join token's secret is empty or has characters other than a-z, A-Z, 0-9, '-' and \
         '_' (spaces, a second '.', padding); {COPY}"
    )]
    BadSecret,
}

const COPY: &str = "copy it whole from `mesh-rendezvous token create`";

impl JoinToken {
    /// The token for id `id` and a freshly drawn `secret`, or `None` when
    /// `id` breaks the id rule ([`is_valid_id`]).
    pub fn new(id: &str, secret: &[u8; 32]) -> Option<Self> {
        if !is_valid_id(id) {
            return None;
        }
        Some(Self {
            text: format!("{id}.{}", URL_SAFE_NO_PAD.encode(secret)),
            dot: id.len(),
        })
    }

    /// The public part, naming the token in `token list` and `token revoke`.
    pub fn id(&self) -> &str {
        self.text.get(..self.dot).unwrap_or_default()
    }

    /// The secret as written (unpadded base64url characters).
    pub fn secret(&self) -> &str {
        self.text.get(self.dot + 1..).unwrap_or_default()
    }

    /// The whole token, secret included: for the token file, the hello and
    /// the one line `token create` prints, never for a log.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;

    /// Checks the one rule; surrounding blanks are the caller's to trim
    /// (a token file's line end, say), inside ones are refused.
    fn from_str(s: &str) -> Result<Self, JoinTokenError> {
        if s.is_empty() {
            return Err(JoinTokenError::Empty);
        }
        if s.len() > MAX_TOKEN {
            return Err(JoinTokenError::TooLong { len: s.len() });
        }
        let (id, secret) = s.split_once('.').ok_or(JoinTokenError::NoDot)?;
        if !is_valid_id(id) {
            return Err(JoinTokenError::BadId);
        }
        if secret.is_empty() || !secret.bytes().all(is_base64url) {
            return Err(JoinTokenError::BadSecret);
        }
        Ok(Self {
            text: s.to_owned(),
            dot: id.len(),
        })
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Whether `id` may name a token: 1 to [`MAX_TOKEN_ID`] of `[A-Za-z0-9_-]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_TOKEN_ID && id.bytes().all(is_base64url)
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What 0.1.0 and 0.2.0 print: 8 hex digits, 32 bytes in base64url.
    const ISSUED: &str = "1f0c9a7e.BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";

    #[test]
    fn every_token_a_rendezvous_issued_parses_and_keeps_its_text() {
        let token: JoinToken = ISSUED.parse().unwrap();
        assert_eq!(token.id(), "1f0c9a7e");
        assert_eq!(token.secret().len(), 43);
        assert_eq!(token.expose(), ISSUED);
        // Ids may use the whole id alphabet, up to its length.
        let id = format!("A-z_{}", "9".repeat(MAX_TOKEN_ID - 4));
        let made = JoinToken::new(&id, &[7; 32]).unwrap();
        assert_eq!(made.expose().parse::<JoinToken>().unwrap(), made);
        assert_eq!(made.id(), id);
        assert_eq!(
            JoinToken::new("1f0c9a7e", &[7; 32]).unwrap().expose(),
            ISSUED
        );
    }

    #[test]
    fn a_text_that_breaks_the_rule_is_refused_with_its_cause_and_never_quoted() {
        let long = format!("abcd.{}", "A".repeat(MAX_TOKEN));
        let cases = [
            ("", JoinTokenError::Empty),
            (long.as_str(), JoinTokenError::TooLong { len: long.len() }),
            ("no-dot-secret", JoinTokenError::NoDot),
            (".secret", JoinTokenError::BadId),
            ("ab cd.secret", JoinTokenError::BadId),
            ("ab!cd.secret", JoinTokenError::BadId),
            ("abcd.", JoinTokenError::BadSecret),
            ("abcd.sec ret", JoinTokenError::BadSecret),
            ("abcd.secret\n", JoinTokenError::BadSecret),
            ("abcd.sec.ret", JoinTokenError::BadSecret),
            ("abcd.secret==", JoinTokenError::BadSecret),
        ];
        for (text, expected) in cases {
            let err = text.parse::<JoinToken>().unwrap_err();
            assert_eq!(err, expected, "{text:?}");
            let message = err.to_string();
            assert!(message.contains("token create"), "{message}");
            assert!(text.len() < 5 || !message.contains(text), "{message}");
        }
        assert!(JoinToken::new("bad id", &[0; 32]).is_none());
        assert!(JoinToken::new("", &[0; 32]).is_none());
    }

    #[test]
    fn debug_shows_the_id_and_never_the_secret() {
        let token: JoinToken = ISSUED.parse().unwrap();
        let debug = format!("{token:?}");
        assert!(debug.contains("1f0c9a7e"), "{debug}");
        assert!(!debug.contains(token.secret()), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }
}
