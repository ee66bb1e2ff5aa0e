//! Moving one message body from the bytes received to the bytes sent, boundaries tracked so
//! that the message's end is known, chunk framing rewritten by the balancer.

use bytes::{Buf, BytesMut};

use super::chunked::{self, TrailerLine};
use super::{Framing, H1Error, MAX_TRAILER_BYTES};

/// What a relay writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// The body in its framing: a length-delimited body as is, a chunked one with bare
    /// chunk-size lines (extensions dropped) and no trailers.
    Framed,
    /// Only the data: a chunked answer to an HTTP/1.0 caller, delimited by closing the
    /// connection (RFC 9112 7: a 1.0 recipient does not understand chunked).
    DataOnly,
}

/// Where a chunked relay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes seen so far.
    Trailers(usize),
}

/// Moves one message body from an input buffer to an output buffer and tells when the body
/// ended. The data bytes (without chunk framing) are handed to a callback: the copy and the
/// answer digest are made of them.
#[derive(Debug)]
pub(crate) struct BodyRelay {
    framing: Framing,
    output: Output,
    remaining: u64,
    chunk: ChunkState,
    done: bool,
}

impl BodyRelay {
    pub(crate) fn new(framing: Framing, output: Output) -> Self {
        BodyRelay {
            framing,
            output,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunk: ChunkState::Size,
            done: framing == Framing::Empty || framing == Framing::Length(0),
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The sender closed: a body delimited by close ends here; any other is cut short.
    pub(crate) fn end_of_input(&mut self) -> bool {
        if self.framing == Framing::UntilClose {
            self.done = true;
        }
        self.done
    }

    /// Moves what `input` holds of the body to `out` (and its data to `data`), consuming it.
    /// Bytes after the body's end stay in `input` (a pipelined next message).
    pub(crate) fn relay(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
        mut data: impl FnMut(&[u8]),
    ) -> Result<(), H1Error> {
        while !self.done && !input.is_empty() {
            match self.framing {
                Framing::Empty => self.done = true,
                Framing::Length(_) => {
                    let take = input
                        .len()
                        .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    data(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input.advance(take);
                    self.remaining -= take as u64;
                    self.done = self.remaining == 0;
                }
                Framing::UntilClose => {
                    data(input);
                    out.extend_from_slice(input);
                    input.clear();
                }
                Framing::Chunked => {
                    if !self.relay_chunked(input, out, &mut data)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn framed(&self) -> bool {
        self.output == Output::Framed
    }

    /// One step of a chunked body; false when `input` holds too little to go on.
    fn relay_chunked(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
        data: &mut impl FnMut(&[u8]),
    ) -> Result<bool, H1Error> {
        match self.chunk {
            ChunkState::Size => {
                let Some((line, size)) = chunked::chunk_line(input)? else {
                    return Ok(false);
                };
                input.advance(line);
                if self.framed() {
                    chunked::write_chunk_line(out, size);
                }
                self.chunk = if size == 0 {
                    ChunkState::Trailers(0)
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(left) => {
                let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                data(&input[..take]);
                out.extend_from_slice(&input[..take]);
                input.advance(take);
                let left = left - take as u64;
                self.chunk = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                };
            }
            ChunkState::DataEnd => {
                if input.len() < 2 {
                    if input[..] != b"\r"[..] {
                        return Err(H1Error::BadChunk("chunk data not followed by CRLF"));
                    }
                    return Ok(false);
                }
                if &input[..2] != b"\r\n" {
                    return Err(H1Error::BadChunk("chunk data not followed by CRLF"));
                }
                if self.framed() {
                    out.extend_from_slice(b"\r\n");
                }
                input.advance(2);
                self.chunk = ChunkState::Size;
            }
            ChunkState::Trailers(seen) => return self.trailer(seen, input, out),
        }
        Ok(true)
    }

    /// One trailer line: checked as a field and dropped; the empty line ends the body.
    fn trailer(
        &mut self,
        seen: usize,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<bool, H1Error> {
        let line = chunked::trailer_line(input)?;
        let length = match line {
            None if seen + input.len() > MAX_TRAILER_BYTES => {
                return Err(H1Error::TrailersTooLarge)
            }
            None => return Ok(false),
            Some(TrailerLine::End) => 2,
            Some(TrailerLine::Field(n)) => n,
        };
        if seen + length > MAX_TRAILER_BYTES {
            return Err(H1Error::TrailersTooLarge);
        }
        input.advance(length);
        if line == Some(TrailerLine::End) {
            if self.framed() {
                out.extend_from_slice(b"\r\n");
            }
            self.done = true;
        } else {
            self.chunk = ChunkState::Trailers(seen + length);
        }
        Ok(true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a relay made of some wire bytes.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Relayed {
        /// Written for the next hop.
        pub out: Vec<u8>,
        /// The body's data.
        pub data: Vec<u8>,
        pub done: bool,
        /// Left over after the body's end.
        pub rest: Vec<u8>,
    }

    /// Relays `wire` split into pieces of the given sizes.
    pub(crate) fn relay_in_pieces(
        framing: Framing,
        output: Output,
        wire: &[u8],
        pieces: &[usize],
    ) -> Result<Relayed, H1Error> {
        let mut relay = BodyRelay::new(framing, output);
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut data = Vec::new();
        let mut at = 0;
        for &size in pieces.iter().chain(std::iter::repeat(&usize::MAX)) {
            if at >= wire.len() {
                break;
            }
            let end = wire.len().min(at.saturating_add(size));
            input.extend_from_slice(&wire[at..end]);
            at = end;
            relay.relay(&mut input, &mut out, |d| data.extend_from_slice(d))?;
            if relay.is_done() {
                break;
            }
        }
        input.extend_from_slice(&wire[at..]);
        Ok(Relayed {
            out,
            data,
            done: relay.is_done(),
            rest: input.to_vec(),
        })
    }

    /// A deterministic spread of split sizes (seeded LCG), so that every framing boundary is
    /// crossed by some split.
    pub(crate) fn splits(seed: u64, count: usize) -> Vec<usize> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (state >> 33) as usize % 7
            })
            .collect()
    }

    #[test]
    fn a_chunked_body_is_rewritten_whatever_the_splits() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        for seed in 0..200 {
            let Relayed {
                out,
                data,
                done,
                rest,
            } = relay_in_pieces(Framing::Chunked, Output::Framed, wire, &splits(seed, 64)).unwrap();
            assert!(done, "seed {seed}");
            // Extensions and trailers are dropped, sizes written bare.
            assert_eq!(
                out, b"4\r\nWiki\r\n5\r\npedia\r\ne\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n",
                "seed {seed}"
            );
            assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.", "seed {seed}");
            assert_eq!(rest, b"GET /next", "seed {seed}");
        }
    }

    #[test]
    fn a_chunked_answer_to_an_old_caller_is_only_its_data() {
        let wire = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let Relayed {
            out,
            data,
            done,
            rest: _,
        } = relay_in_pieces(Framing::Chunked, Output::DataOnly, wire, &[5]).unwrap();
        assert!(done);
        assert_eq!(
            (out.as_slice(), data.as_slice()),
            (&b"abcde"[..], &b"abcde"[..])
        );
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_leaves_the_next_message() {
        for seed in 0..50 {
            let Relayed {
                out,
                data,
                done,
                rest,
            } = relay_in_pieces(
                Framing::Length(5),
                Output::Framed,
                b"helloGET /",
                &splits(seed, 16),
            )
            .unwrap();
            assert!(done);
            assert_eq!(
                (out.as_slice(), data.as_slice()),
                (&b"hello"[..], &b"hello"[..])
            );
            assert_eq!(rest, b"GET /");
        }
        let Relayed {
            out: _,
            data: _,
            done,
            rest: _,
        } = relay_in_pieces(Framing::Length(9), Output::Framed, b"hel", &[3]).unwrap();
        assert!(!done, "three bytes of nine");
    }

    #[test]
    fn a_body_until_close_ends_only_at_close() {
        let mut relay = BodyRelay::new(Framing::UntilClose, Output::Framed);
        let mut input = BytesMut::from(&b"abc"[..]);
        let mut out = Vec::new();
        relay.relay(&mut input, &mut out, |_| {}).unwrap();
        assert!(!relay.is_done());
        assert!(relay.end_of_input());
        assert!(
            !BodyRelay::new(Framing::Length(3), Output::Framed).end_of_input(),
            "cut short"
        );
        assert!(BodyRelay::new(Framing::Empty, Output::Framed).is_done());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        let relay =
            |wire: &[u8]| relay_in_pieces(Framing::Chunked, Output::Framed, wire, &[usize::MAX]);
        for wire in [
            &b"zz\r\n"[..],
            b"3\r\nabcXY",
            b"3\r\nabc\n0\r\n\r\n",
            b"\r\n",
            b"0\r\nX: \x00\r\n\r\n",
            b"0\r\n\n",
        ] {
            assert!(
                matches!(relay(wire), Err(H1Error::BadChunk(_))),
                "{wire:?}: {:?}",
                relay(wire)
            );
        }
        // The trailer section is not over yet: more input is needed, no error.
        let Relayed { done, .. } = relay(b"0\r\n").unwrap();
        assert!(!done);
        let huge = [&b"0\r\nX: "[..], &vec![b'a'; MAX_TRAILER_BYTES + 1]].concat();
        assert_eq!(relay(&huge), Err(H1Error::TrailersTooLarge));
    }
}
