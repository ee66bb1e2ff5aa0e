//! The grammar of a chunked body's own lines (RFC 9112 7.1): chunk-size lines and trailer
//! fields. Checked strictly because these lines are where two parsers disagree (the desync class
//! of CVE-2025-22871: bare LF, NUL, an empty size taken as the last chunk); the balancer never
//! forwards them as received: it writes a bare size line and drops extensions and trailers.

use super::H1Error;

/// The longest chunk-size line accepted, extensions included.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;

/// `tchar` of RFC 9110 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte of a field value or quoted text: visible ASCII, SP, HTAB or obs-text; never a control.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Reading position within a line; `None` from a step means the line is not all here yet.
struct Cursor<'a> {
    line: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.line.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// One or more `tchar`; `Ok(None)` when the input ends inside it.
    fn token(&mut self, what: &'static str) -> Result<Option<()>, H1Error> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        match self.peek() {
            None => Ok(None),
            Some(_) if self.at == start => Err(H1Error::BadChunk(what)),
            Some(_) => Ok(Some(())),
        }
    }

    /// A quoted-string (the opening quote is next).
    fn quoted(&mut self) -> Result<Option<()>, H1Error> {
        self.at += 1;
        loop {
            match self.peek() {
                None => return Ok(None),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Some(()));
                }
                Some(b'\\') => {
                    self.at += 1;
                    match self.peek() {
                        None => return Ok(None),
                        Some(b) if is_field_byte(b) => self.at += 1,
                        Some(_) => return Err(H1Error::BadChunk("a control byte in an extension")),
                    }
                }
                Some(b) if is_field_byte(b) => self.at += 1,
                Some(_) => return Err(H1Error::BadChunk("a control byte in an extension")),
            }
        }
    }

    /// CRLF next: `Ok(Some(()))` consumed it; a bare CR or LF is refused.
    fn crlf(&mut self) -> Result<Option<()>, H1Error> {
        match (self.peek(), self.line.get(self.at + 1)) {
            (Some(b'\r'), Some(b'\n')) => {
                self.at += 2;
                Ok(Some(()))
            }
            (Some(b'\r'), None) => Ok(None),
            _ => Err(H1Error::BadChunk("a line not ended by CRLF")),
        }
    }
}

/// Parses a chunk-size line at the start of `input`: `1*HEXDIG *( BWS ";" BWS name [ BWS "="
/// BWS ( token / quoted-string ) ] ) CRLF`. Returns the line's length and the chunk size, or
/// `None` while the line is incomplete.
pub(crate) fn chunk_line(input: &[u8]) -> Result<Option<(usize, u64)>, H1Error> {
    match parse_chunk_line(input)? {
        Some(done) => Ok(Some(done)),
        None if input.len() >= MAX_CHUNK_LINE => Err(H1Error::BadChunk("chunk-size line too long")),
        None => Ok(None),
    }
}

fn parse_chunk_line(input: &[u8]) -> Result<Option<(usize, u64)>, H1Error> {
    let mut size: u64 = 0;
    let mut digits = 0;
    while let Some(digit) = input.get(digits).and_then(|b| (*b as char).to_digit(16)) {
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or(H1Error::BadChunk("chunk size overflows 64 bits"))?;
        digits += 1;
    }
    if digits == input.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err(H1Error::BadChunk("a chunk-size line without a size"));
    }
    let mut cursor = Cursor {
        line: input,
        at: digits,
    };
    loop {
        if cursor.peek() == Some(b'\r') || cursor.peek() == Some(b'\n') {
            return Ok(cursor.crlf()?.map(|()| (cursor.at, size)));
        }
        cursor.skip_ws();
        match cursor.peek() {
            None => return Ok(None),
            Some(b';') => cursor.at += 1,
            Some(_) => return Err(H1Error::BadChunk("unexpected byte after the chunk size")),
        }
        cursor.skip_ws();
        if cursor.token("an extension without a name")?.is_none() {
            return Ok(None);
        }
        let before_value = cursor.at;
        cursor.skip_ws();
        if cursor.peek() != Some(b'=') {
            cursor.at = before_value;
            continue;
        }
        cursor.at += 1;
        cursor.skip_ws();
        let value = match cursor.peek() {
            None => return Ok(None),
            Some(b'"') => cursor.quoted()?,
            Some(_) => cursor.token("an extension with an empty value")?,
        };
        if value.is_none() {
            return Ok(None);
        }
    }
}

/// What one trailer line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrailerLine {
    /// A well-formed field of this many bytes (CRLF included).
    Field(usize),
    /// The empty line that ends the body.
    End,
}

/// Parses one trailer line at the start of `input` as a field (`token ":" OWS value OWS CRLF`,
/// value bytes visible, SP, HTAB or obs-text); `None` while incomplete.
pub(crate) fn trailer_line(input: &[u8]) -> Result<Option<TrailerLine>, H1Error> {
    let mut cursor = Cursor { line: input, at: 0 };
    if matches!(cursor.peek(), Some(b'\r' | b'\n')) {
        return Ok(cursor.crlf()?.map(|()| TrailerLine::End));
    }
    if cursor.token("a trailer without a field name")?.is_none() {
        return Ok(None);
    }
    match cursor.peek() {
        None => return Ok(None),
        Some(b':') => cursor.at += 1,
        Some(_) => {
            return Err(H1Error::BadChunk(
                "a trailer field name not followed by ':'",
            ))
        }
    }
    while let Some(b) = cursor.peek() {
        if !is_field_byte(b) {
            break;
        }
        cursor.at += 1;
    }
    match cursor.peek() {
        None => Ok(None),
        Some(b'\r' | b'\n') => Ok(cursor.crlf()?.map(|()| TrailerLine::Field(cursor.at))),
        Some(_) => Err(H1Error::BadChunk("a control byte in a trailer")),
    }
}

/// Writes a chunk-size line for `size` (lowercase hex, no extension).
pub(crate) fn write_chunk_line(out: &mut Vec<u8>, size: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = size;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(rest & 0xf) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &[u8]) -> Result<Option<(usize, u64)>, H1Error> {
        chunk_line(text)
    }

    #[test]
    fn sizes_and_extensions_that_parse() {
        assert_eq!(line(b"5\r\nhello"), Ok(Some((3, 5))));
        assert_eq!(line(b"0000A\r\n"), Ok(Some((7, 10))));
        assert_eq!(line(b"ff;name\r\n"), Ok(Some((9, 255))));
        assert_eq!(line(b"1 ; a = b ;c=\"q \\\" s\"\r\n"), Ok(Some((23, 1))));
        assert_eq!(line(b"ffffffffffffffff\r\n"), Ok(Some((18, u64::MAX))));
    }

    #[test]
    fn incomplete_lines_ask_for_more() {
        for partial in [
            &b""[..],
            b"5",
            b"5\r",
            b"5;",
            b"5;a",
            b"5;a=",
            b"5;a=\"x",
            b"5 ",
        ] {
            assert_eq!(line(partial), Ok(None), "{partial:?}");
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for bad in [
            &b"\r\n"[..],         // empty size: not the last chunk
            b";a\r\n",            // no size at all
            b"5\n",               // bare LF
            b"5\rx",              // bare CR
            b"5 \r\n",            // whitespace without an extension
            b"5;\r\n",            // extension without a name
            b"5;a=\r\n",          // extension with an empty value
            b"5;a\x00\r\n",       // NUL
            b"5;a=\"x\x01\"\r\n", // control byte in a quoted value
            b"-5\r\n",
            b"0x5\r\n",
            b"10000000000000000\r\n", // 2^64
        ] {
            assert!(
                matches!(line(bad), Err(H1Error::BadChunk(_))),
                "{bad:?}: {:?}",
                line(bad)
            );
        }
        let long = [b"5;a=".as_slice(), &[b'x'; MAX_CHUNK_LINE]].concat();
        assert!(matches!(line(&long), Err(H1Error::BadChunk(_))));
    }

    #[test]
    fn trailer_lines() {
        assert_eq!(trailer_line(b"\r\n"), Ok(Some(TrailerLine::End)));
        assert_eq!(
            trailer_line(b"X-Sum: 1 2\r\n"),
            Ok(Some(TrailerLine::Field(12)))
        );
        assert_eq!(trailer_line(b"X-Sum: 1"), Ok(None));
        for bad in [
            &b"\n"[..],
            b"X-Sum 1\r\n",
            b": 1\r\n",
            b"X-Sum: \x00\r\n",
            b"X-Sum: 1\n",
            b" X-Sum: 1\r\n",
        ] {
            assert!(trailer_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunk_lines_are_written_bare() {
        for size in [0u64, 9, 10, 255, 4096, u64::MAX] {
            let mut out = Vec::new();
            write_chunk_line(&mut out, size);
            assert_eq!(out, format!("{size:x}\r\n").into_bytes());
        }
    }
}
