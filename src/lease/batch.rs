//! Cutting ack ids into requests Pub/Sub accepts: at most 1,000 ids and
//! about 500 KiB per Acknowledge or ModifyAckDeadline, the official clients'
//! limits under the service's 512 KiB request cap. Real ack ids are a few
//! hundred bytes (the emulator's are much shorter), so both bounds matter.

/// Most ack ids in one request.
pub const MAX_IDS: usize = 1_000;

/// Most bytes of ack ids in one request, leaving room under 512 KiB for the
/// subscription name and the other fields.
pub const MAX_BYTES: usize = 500 * 1024;

/// What one id costs in the encoded request: its bytes, the field tag and
/// the length prefix.
fn encoded_len(id: &str) -> usize {
    id.len() + 1 + prost::encoding::encoded_len_varint(id.len() as u64)
}

/// `ids` in order, cut into batches within [`MAX_IDS`] and [`MAX_BYTES`].
pub fn batches(ids: &[String]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0;
    for id in ids {
        let cost = encoded_len(id);
        match out.last_mut() {
            Some(batch) if batch.len() < MAX_IDS && bytes + cost <= MAX_BYTES => {
                batch.push(id.clone());
                bytes += cost;
            }
            _ => {
                out.push(vec![id.clone()]);
                bytes = cost;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` ack ids of `len` bytes, like the real service's.
    fn ids(n: usize, len: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:0len$}")).collect()
    }

    fn sizes(batches: &[Vec<String>]) -> Vec<usize> {
        batches.iter().map(Vec::len).collect()
    }

    #[test]
    fn real_sized_ids_are_cut_at_1000() {
        // 300-byte ids: 1,000 of them are about 300 KiB, under the byte bound.
        let b = batches(&ids(2_500, 300));
        assert_eq!(sizes(&b), vec![1000, 1000, 500]);
        assert_eq!(b.concat(), ids(2_500, 300), "every id once, in order");
    }

    #[test]
    fn long_ids_are_cut_by_bytes() {
        // 1,000 ids of 700 bytes would be about 700 KiB: cut by bytes instead.
        let b = batches(&ids(1_000, 700));
        for batch in &b {
            let bytes: usize = batch.iter().map(|id| encoded_len(id)).sum();
            assert!(bytes <= MAX_BYTES, "{bytes} bytes");
        }
        assert_eq!(sizes(&b), vec![728, 272]);
    }

    #[test]
    fn nothing_makes_no_batch() {
        assert!(batches(&[]).is_empty());
    }
}
