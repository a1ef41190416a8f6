//! The client request budget: bytes of client request bodies a node holds
//! at once, all connections together (`limits.client-request-budget-mb`).

use std::sync::Arc;
use std::time::Duration;

use shoal_client::frame::{self, BodySource, FrameError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a request body may take to arrive once the budget for it is
/// held: a client that declares a body and sends it slowly, or never, holds
/// the budget no longer than this.
const BODY_WITHIN: Duration = Duration::from_secs(10);

/// Reads a request body of `len` bytes once room for all of it is taken
/// from `budget`, then as its bytes arrive, within [`BODY_WITHIN`]. Returns
/// the body and the budget it holds (given back when the request is
/// answered).
///
/// The whole declared size is taken up front, and waited for in line (the
/// semaphore is fair): a body holding part of the budget while it waited
/// for the rest could wait for what another body held, and that body for
/// what it held, until both timed out. Holding all or nothing, every body
/// that holds budget can finish, so every body in line gets its turn. The
/// config makes the budget at least one largest request. Memory follows
/// the bytes as they arrive ([`frame::read_body_of`]); a body of more than
/// a megabyte arrives in pages joined at the end, so it takes twice its
/// size for a moment.
pub(super) async fn read_budgeted(
    recv: &mut impl BodySource,
    len: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Vec<u8>, OwnedSemaphorePermit), FrameError> {
    let permits = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: u32::MAX as usize,
    })?;
    let held = budget
        .clone()
        .acquire_many_owned(permits)
        .await
        .expect("the budget is never closed");
    let read = async { Ok((frame::read_body_of(recv, len).await?, held)) };
    tokio::time::timeout(BODY_WITHIN, read)
        .await
        .unwrap_or_else(|_| {
            Err(FrameError::Stream(format!(
                "a {len}-byte body did not arrive within {BODY_WITHIN:?}"
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Bytes a test's body arrives in at most.
    const CHUNK: usize = 64 << 10;

    /// A body arriving `chunk` bytes at a time, each a millisecond after
    /// the one before.
    struct Trickle {
        left: usize,
        chunk: usize,
    }

    impl BodySource for Trickle {
        async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, String> {
            if self.left == 0 {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            let n = self.left.min(self.chunk).min(max);
            self.left -= n;
            Ok(Some(Bytes::from(vec![7u8; n])))
        }
    }

    /// Two bodies as large as the whole budget arrive at once, in small
    /// chunks. Holding part of the budget while waiting for the rest, each
    /// would wait for what the other holds until both timed out; both must
    /// be read, one after the other.
    #[tokio::test(start_paused = true)]
    async fn two_large_bodies_at_once_are_both_read() {
        let size = 4 * CHUNK;
        let budget = Arc::new(Semaphore::new(size));
        let read = |budget: Arc<Semaphore>| async move {
            let mut body = Trickle {
                left: size,
                chunk: CHUNK / 2,
            };
            let (bytes, permit) = read_budgeted(&mut body, size, &budget).await?;
            // The request is handled, then answered: the budget goes back.
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(permit);
            Ok::<usize, FrameError>(bytes.len())
        };
        let started = tokio::time::Instant::now();
        let (a, b) = tokio::join!(
            tokio::spawn(read(budget.clone())),
            tokio::spawn(read(budget.clone()))
        );
        assert_eq!(a.unwrap().unwrap(), size);
        assert_eq!(b.unwrap().unwrap(), size);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(budget.available_permits(), size);
    }
}
