//! The frame codec shared by every Shoal connection (client and peer ports).
//!
//! A frame is `u32 length | u32 crc32 | MessagePack body`, both integers big
//! endian; `length` counts the body only and `crc32` covers the body. A reader
//! refuses a length over its cap before reading the body, and grows the body
//! as its bytes arrive, so a hostile or broken peer cannot make a node
//! allocate more than the cap, nor more than it actually sent. One frame is one message;
//! a stream carries a sequence of them (see [`crate::rpc`]), so a bad frame
//! poisons only that stream.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes before the body: length and checksum.
pub const HEADER_LEN: usize = 8;

/// Most bytes a reader takes from a stream at once.
const READ_CHUNK: usize = 64 << 10;

/// A message of more than this many bytes is encoded, checked and decoded
/// off the runtime's worker ([`off_worker`]): 60 MiB took 150 ms of a
/// worker's time, mostly faulting in fresh pages.
pub const BULK_BYTES: usize = 1 << 20;

/// Runs `work`, CPU or disk work that may take many milliseconds (a frame
/// or an object of megabytes), without stalling the other tasks of the
/// worker thread it runs on, the connections' among them: on a
/// multi-threaded runtime the worker hands its other tasks to another
/// thread first ([`tokio::task::block_in_place`]). A process whose runtime
/// stalls stops acknowledging packets, and its peers take it for dead
/// ([`crate::rpc`]). On a current-thread runtime, or outside one, it just
/// runs `work`.
pub fn off_worker<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Runs `work`, which handles about `bytes` bytes, [`off_worker`] when
/// they are over [`BULK_BYTES`], else right here.
pub fn off_worker_for<R>(bytes: usize, work: impl FnOnce() -> R) -> R {
    if bytes > BULK_BYTES {
        off_worker(work)
    } else {
        work()
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame body of {len} bytes exceeds the {max}-byte cap")]
    TooLarge { len: usize, max: usize },
    #[error(
        "frame checksum mismatch: header says {expected:#010x}, body hashes to {actual:#010x}"
    )]
    Checksum { expected: u32, actual: u32 },
    #[error("frame body is not a valid message: {0}")]
    Decode(String),
    #[error("message could not be encoded: {0}")]
    Encode(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream error: {0}")]
    Stream(String),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    rmp_serde::encode::write_named(&mut buf, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let body_len = buf.len() - HEADER_LEN;
    let len = u32::try_from(body_len).map_err(|_| FrameError::TooLarge {
        len: body_len,
        max: u32::MAX as usize,
    })?;
    let crc = crc32fast::hash(&buf[HEADER_LEN..]);
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    buf[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(buf)
}

/// Parses a frame header: body length and checksum, checking the cap.
pub fn parse_header(header: &[u8; HEADER_LEN], max: usize) -> Result<(usize, u32), FrameError> {
    let len = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((len, crc))
}

/// Checks a body against its header checksum and decodes it; a body of
/// more than [`BULK_BYTES`] off the worker.
pub fn decode_body<T: DeserializeOwned>(body: &[u8], crc: u32) -> Result<T, FrameError> {
    off_worker_for(body.len(), || check_and_decode(body, crc))
}

fn check_and_decode<T: DeserializeOwned>(body: &[u8], crc: u32) -> Result<T, FrameError> {
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(FrameError::Checksum {
            expected: crc,
            actual,
        });
    }
    rmp_serde::from_slice(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Decodes a whole frame held in memory (tests, fuzzing).
pub fn decode<T: DeserializeOwned>(frame: &[u8], max: usize) -> Result<T, FrameError> {
    let header: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let (len, crc) = parse_header(header, max)?;
    let body = frame
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(FrameError::Truncated)?;
    decode_body(body, crc)
}

/// Reads one frame from a QUIC stream.
pub async fn read<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, FrameError> {
    read_next(recv, max).await?.ok_or(FrameError::Truncated)
}

/// Reads the next frame of a stream, or `None` if the stream finished
/// cleanly where a frame would start.
pub async fn read_next<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, FrameError> {
    read_body(recv, max)
        .await?
        .map(|(body, crc)| decode_body(&body, crc))
        .transpose()
}

/// Reads the next frame's body and header checksum, unchecked and undecoded,
/// or `None` at a clean end of the stream.
pub async fn read_body(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<(Vec<u8>, u32)>, FrameError> {
    let Some((len, crc)) = read_header(recv, max).await? else {
        return Ok(None);
    };
    Ok(Some((read_body_of(recv, len).await?, crc)))
}

/// Reads the next frame's header (body length, checked against `max`, and
/// checksum), or `None` at a clean end of the stream.
pub async fn read_header(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<(usize, u32)>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_error(e)),
    }
    parse_header(&header, max).map(Some)
}

/// Where a body's bytes come from: a QUIC stream (or a test's).
pub trait BodySource: Send {
    /// The next chunk of at most `max` bytes; `None` at the end.
    fn next_chunk(
        &mut self,
        max: usize,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl BodySource for quinn::RecvStream {
    async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, String> {
        self.read_chunk(max, true)
            .await
            .map(|c| c.map(|c| c.bytes))
            .map_err(|e| e.to_string())
    }
}

/// Reads a body of `len` bytes, whose header was just read. Memory follows
/// the bytes received, not the length declared: they are copied out of
/// the stream's chunks (which pin whole datagrams) into pages of at most
/// [`BULK_BYTES`] as they arrive, and the pages of a body of more than one
/// are joined off the worker (growing one buffer as they arrived copied
/// and faulted in tens of megabytes on it).
pub async fn read_body_of(recv: &mut impl BodySource, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut page = Vec::with_capacity(len.min(READ_CHUNK));
    let mut full: Vec<Vec<u8>> = Vec::new();
    let mut received = 0;
    while received < len {
        let want = (len - received).min(READ_CHUNK);
        let chunk = match recv.next_chunk(want).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Err(FrameError::Truncated),
            Err(e) => return Err(FrameError::Stream(e)),
        };
        received += chunk.len();
        if page.len() + chunk.len() > BULK_BYTES {
            full.push(std::mem::replace(&mut page, chunk.to_vec()));
        } else {
            page.extend_from_slice(&chunk);
        }
    }
    if full.is_empty() {
        return Ok(page);
    }
    full.push(page);
    Ok(off_worker(|| full.concat()))
}

/// Writes one frame to a QUIC stream and finishes the sending side.
pub async fn write<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    write_raw(send, &buf).await
}

/// Writes bytes already framed (or deliberately malformed, in tests) and finishes.
pub async fn write_raw(send: &mut quinn::SendStream, buf: &[u8]) -> Result<(), FrameError> {
    send.write_all(buf)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    send.finish()
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    Ok(())
}

fn read_error(e: quinn::ReadExactError) -> FrameError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        quinn::ReadExactError::ReadError(e) => FrameError::Stream(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let msg = vec!["a".to_string(), "bc".to_string()];
        let frame = encode(&msg).unwrap();
        assert_eq!(decode::<Vec<String>>(&frame, 1024).unwrap(), msg);
    }

    #[test]
    fn flipped_byte_is_a_checksum_error() {
        let mut frame = encode(&"hello".to_string()).unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert!(matches!(
            decode::<String>(&frame, 1024),
            Err(FrameError::Checksum { .. })
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut frame = encode(&"x".repeat(100)).unwrap();
        frame[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode::<String>(&frame, 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }

    /// A body arriving in the given chunks, cut to what each read asks.
    struct Arriving(Vec<u8>, usize);

    impl BodySource for Arriving {
        async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, String> {
            if self.0.is_empty() {
                return Ok(None);
            }
            let n = self.0.len().min(max).min(self.1);
            Ok(Some(Bytes::from(self.0.drain(..n).collect::<Vec<u8>>())))
        }
    }

    /// A body of several pages comes out whole and in order (joined off
    /// the worker), a small one too, and one cut short is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn bodies_of_one_page_or_many_are_read_whole() {
        for (len, chunk) in [
            (3 * BULK_BYTES + 5, 40_000),
            (1000, 300),
            (BULK_BYTES, READ_CHUNK),
        ] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut source = Arriving(body.clone(), chunk);
            assert!(
                read_body_of(&mut source, len).await.unwrap() == body,
                "{len}"
            );
            let mut short = Arriving(body[..len - 1].to_vec(), chunk);
            assert!(matches!(
                read_body_of(&mut short, len).await,
                Err(FrameError::Truncated)
            ));
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<crate::proto::Request>(&bytes, 1 << 20);
        }
    }
}
