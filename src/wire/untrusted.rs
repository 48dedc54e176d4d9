//! A peer's text as it may appear in a log line or an error.
//!
//! Pure. Anyone who reaches the rendezvous (and the rendezvous, for a node)
//! chooses names, token ids and the text serde quotes back in its errors:
//! unbounded, that is a 15 KB log line per connection, or terminal escapes
//! in an operator's shell. [`Untrusted`] prints at most [`MAX_CHARS`]
//! characters, escaped as Rust's `escape_debug` does (control characters,
//! quotes and backslashes become escapes), and says how much it left out.

use std::fmt;

/// Characters of a peer's text that reach a log line.
pub const MAX_CHARS: usize = 64;

/// Displays its text bounded and escaped; use as `%Untrusted(&name)`.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "…(+{} bytes)", self.0.len() - at)?;
        }
        Ok(())
    }
}

/// [`Untrusted`] as an owned string, for an error that outlives the input.
pub fn bounded(text: &str) -> String {
    Untrusted(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_prints_as_it_is() {
        assert_eq!(bounded("node-a"), "node-a");
    }

    #[test]
    fn long_text_is_cut_and_says_how_much_was_left_out() {
        let text = "x".repeat(15_000);
        assert_eq!(
            bounded(&text),
            format!("{}…(+{} bytes)", "x".repeat(MAX_CHARS), 15_000 - MAX_CHARS)
        );
    }

    #[test]
    fn control_characters_and_quotes_are_escaped() {
        assert_eq!(bounded("a\nb\u{1b}[2J\"c"), "a\\nb\\u{1b}[2J\\\"c");
    }

    #[test]
    fn multibyte_text_is_cut_on_a_character_boundary() {
        let text = "é".repeat(100);
        assert_eq!(
            bounded(&text),
            format!("{}…(+72 bytes)", "é".repeat(MAX_CHARS))
        );
    }
}
