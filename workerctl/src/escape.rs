//! Text from the broker made safe to print on an operator's terminal.
//!
//! What `workerctl` prints is written by others: a dead letter's reason is a handler's
//! error text (often echoing the job's input), ids and payloads come from whoever
//! enqueues, a worker's id and host from whatever registers. Printed raw, an escape
//! sequence in them is run by the terminal (`ESC ] 0 ;` retitles the window,
//! `ESC [ 2 J` clears it, OSC 52 writes the clipboard), a line break forges a table
//! row, and a bidi override shows text in another order than it is stored.
//!
//! [`escape`] is for text and tables: those characters are shown as visible escapes,
//! and every line stays one line. [`escape_json`] is for `--json`: serde_json already
//! escapes C0 controls but writes DEL, C1 controls (`U+009B` is a CSI to terminals
//! that read C1 in UTF-8), line separators and bidi controls raw; they become `\uXXXX`,
//! which any JSON parser reads back to exactly the original text.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether a terminal acts on `c` instead of just showing it: control characters
/// (C0, DEL, C1), the line and paragraph separators, and the bidi controls that
/// reorder what follows them. Invisible characters that only join or break (U+200B to
/// U+200D, U+2060, U+FEFF) are left alone: they move nothing, and emoji and several
/// scripts need them.
fn acts_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}'
                // Arabic letter mark, left-to-right and right-to-left marks.
                | '\u{061c}' | '\u{200e}' | '\u{200f}'
                // Embeddings, pop, overrides.
                | '\u{202a}'..='\u{202e}'
                // Isolates and their pop.
                | '\u{2066}'..='\u{2069}'
        )
}

/// `s` for a table cell or a line of text: `\t`, `\n`, `\r`, other C0 controls and
/// DEL as `\x1b`, everything else [`acts_on_terminal`] names as `\u{202e}`; a
/// backslash doubles, so what is shown reads back to exactly one original.
pub(crate) fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || acts_on_terminal(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '\t' => out.push_str(r"\t"),
            '\n' => out.push_str(r"\n"),
            '\r' => out.push_str(r"\r"),
            c if c.is_ascii() && acts_on_terminal(c) => {
                let _ = write!(out, r"\x{:02x}", u32::from(c));
            }
            c if acts_on_terminal(c) => {
                let _ = write!(out, r"\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialized JSON with every character [`acts_on_terminal`] names written as a
/// `\uXXXX` escape: the same document to a parser, nothing for a terminal to act on.
/// Such characters can only stand inside strings (JSON's own whitespace, which is
/// kept, is the only control allowed outside one), where a `\uXXXX` means the same
/// character; they are all in the Basic Multilingual Plane, so one escape each.
pub(crate) fn escape_json(json: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| acts_on_terminal(c) && !matches!(c, '\n' | '\r' | '\t');
    if !json.chars().any(unsafe_char) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if unsafe_char(c) {
            let _ = write!(out, r"\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in [
            "",
            "handler said no",
            "naïve 日本語 ⚠️ 👨\u{200d}👩",
            "a'b\"c",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(t) if t == s), "{s:?}");
            assert!(
                matches!(escape_json(s), Cow::Borrowed(t) if t == s),
                "{s:?}"
            );
        }
    }

    #[test]
    fn terminal_sequences_are_shown_not_sent() {
        assert_eq!(escape("\x1b]0;pwned\x07"), r"\x1b]0;pwned\x07");
        assert_eq!(
            escape("\x1b[2J\x1b]52;c;aGk=\x07"),
            r"\x1b[2J\x1b]52;c;aGk=\x07"
        );
        assert_eq!(escape("a\tb\nc\rd\0e\x7f"), r"a\tb\nc\rd\x00e\x7f");
        // C1: U+009B is CSI to a terminal that reads C1 in UTF-8; U+0085 is NEL.
        assert_eq!(escape("\u{9b}31m\u{85}"), r"\u{9b}31m\u{85}");
        assert_eq!(escape("one\u{2028}two\u{2029}"), r"one\u{2028}two\u{2029}");
        assert_eq!(
            escape("\u{202e}gnp.exe\u{202c} \u{2066}x\u{2069} \u{200f}\u{061c}"),
            r"\u{202e}gnp.exe\u{202c} \u{2066}x\u{2069} \u{200f}\u{61c}"
        );
    }

    #[test]
    fn a_backslash_doubles_so_an_escape_cannot_be_forged() {
        assert_eq!(escape(r"C:\jobs"), r"C:\\jobs");
        assert_ne!(escape(r"\x1b"), escape("\x1b"));
    }

    #[test]
    fn escaped_text_has_nothing_a_terminal_acts_on() {
        let every: String = (0..=0x20ffu32).filter_map(char::from_u32).collect();
        let shown = escape(&every);
        assert!(!shown.chars().any(acts_on_terminal), "{shown:?}");
        assert!(!shown.contains('\n'));
    }

    #[test]
    fn json_keeps_its_meaning_and_loses_the_raw_characters() {
        let reason = "\x1b]0;x\x07\u{9b}2J\x7f \u{202e}abc\u{2069}\u{2028}\\\"é";
        let doc = serde_json::json!({ "reason": reason, "n": [1, 2] });
        for text in [doc.to_string(), format!("{doc:#}")] {
            let safe = escape_json(&text);
            assert!(
                !safe.chars().any(|c| acts_on_terminal(c) && c != '\n'),
                "{safe}"
            );
            assert!(
                safe.contains(r"\u009b") && safe.contains(r"\u202e"),
                "{safe}"
            );
            let back: serde_json::Value =
                serde_json::from_str(&safe).unwrap_or_else(|e| panic!("{e}: {safe}"));
            assert_eq!(back, doc);
            assert_eq!(back["reason"], reason);
        }
    }
}
