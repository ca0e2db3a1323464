//! Children's output pipes (role hooks, service backup commands), read to their end so a
//! child never blocks writing, with at most a bounded number of bytes kept.

use tokio::io::AsyncReadExt;

/// Reads `pipe` to its end (so the child never blocks writing to it), keeping the first
/// `max` bytes.
pub async fn read_bounded(
    pipe: &mut (impl AsyncReadExt + Unpin),
    into: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if into.len() < max {
            into.extend_from_slice(&buf[..n.min(max - into.len())]);
        }
    }
}
